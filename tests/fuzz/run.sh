#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer harnesses (clang, ASan + UBSan) and runs each for SECONDS (default 60) on a
# copy of its seed corpus. Exit status non-zero on any finding (crash, sanitizer report, timeout,
# memory over 2 GB); the reproducer is left in build/fuzz/findings. Usage: bash tests/fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
command -v clang++ >/dev/null || { echo "tests/fuzz/run.sh: clang++ is missing (bash .ci/install-deps.sh installs it)"; exit 1; }
# No build type: NDEBUG stays undefined, so library assertions stay on while fuzzing.
cmake -S tests/fuzz -B build/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ > /dev/null
ninja -C build/fuzz > /dev/null
mkdir -p build/fuzz/findings
for corpus in tests/fuzz/corpus/*/; do
  name=$(basename "$corpus")
  work=$(mktemp -d)
  cp -r "$corpus"/. "$work"
  echo "-- tidal_fuzz_$name: ${seconds}s"
  # Inputs up to 64 KiB: deep nesting and large counts need room (libFuzzer's default is 4 KiB).
  build/fuzz/tidal_fuzz_"$name" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -artifact_prefix=build/fuzz/findings/ -print_final_stats=1 "$work" 2> build/fuzz/"$name".log \
    || { tail -40 build/fuzz/"$name".log; rm -rf "$work"; exit 1; }
  grep -E "stat::number_of_executed_units|Done" build/fuzz/"$name".log | tail -2
  rm -rf "$work"
done
