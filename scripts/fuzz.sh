#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer coverage instrumentation on the stable toolchain
# (the flags below are what `cargo fuzz` passes, minus the nightly-only sanitizer), then runs each
# for FUZZ_SECONDS (default 60) over a corpus seeded with valid frames. Any crash fails the script;
# libFuzzer leaves the input as fuzz/artifacts/<target>/crash-* to turn into a regression test.
# With a nightly toolchain, `cargo fuzz run decode_frame` works on the same targets.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-60}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, as cargo fuzz does.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target-dir target --target "$host"
for target in decode_frame handshake client client_sequences; do
  corpus="corpus/$target"
  mkdir -p "$corpus" "artifacts/$target"
  cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "== fuzzing $target for ${seconds}s"
  ./target/"$host"/release/"$target" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1
done
