#!/usr/bin/env bash
# The test command the README names: every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
cargo test --workspace --doc
