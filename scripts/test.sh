#!/usr/bin/env bash
# The test command the README names: every test in the workspace, including the real-kernel fault
# suite (which needs root, iproute2 and nftables; it is skipped with a message without them, and
# fails under CI=true). Afterwards it prints the liveness table that suite measured.
set -euo pipefail
cd "$(dirname "$0")/.."
report=target/debug/liveness-report.md
rm -f "$report"
# The real-kernel suite and the Prometheus test run the probe binaries; `cargo test` alone builds
# binary targets only as test harnesses, so build them first.
cargo build --workspace --bins
cargo test --workspace --all-targets --no-fail-fast
cargo test --workspace --doc
# Every public item documented, every intra-doc link resolving.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
if [ -s "$report" ]; then
  echo
  echo "Liveness guarantees measured by tests/tests/netns.rs:"
  echo "| fault | bound | client detection | server detection | recovery | requests unresolved |"
  echo "|---|---|---|---|---|---|"
  cat "$report"
fi
