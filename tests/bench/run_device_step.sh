#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call for the GPU decode step and the CPU expert kernels together (a machine start is
# the scarce thing): build with CUDA (run_device_cuda.sh's build: the tests, tidal_bench_cuda and
# tidal_bench_experts), run the whole C++ suite once (CPU kernels on this machine's AVX-512 / AMX
# and the CUDA tests; the CudaModel tests again under each of TEST_ENVS), then the decode step under each entry of STEP_ENVS (ENV=VALUE joined by
# '+', "-" for the defaults; STEP_REPS rounds, interleaved) with its kernel stamps (Note [Kernel
# stamps]), then the M = 1 expert op (EXPERT_REPS rounds of int4 and int8 on all threads, one
# process per entry of EXPERT_ENVS).
# Each part is cut at LIMIT seconds from the start (default 580). Outputs in $OUT: cpp_tests.log
# (its summary on stdout), step.jsonl, step_summary.txt, experts.jsonl.
set -uo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
limit=${LIMIT:-580}
failed=0
left() { echo $((limit - SECONDS)); }
OUT="$out" STEPS=build NINJA_TARGETS="${NINJA_TARGETS:-tidal_tests tidal_bench_cuda tidal_bench_experts}" \
  bash tests/bench/run_device_cuda.sh || exit 1
echo "built at ${SECONDS}s"
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
lscpu | grep -E "Model name|NUMA node\(s\)" || true
if [ -z "${SKIP_TESTS:-}" ]; then
  t=$(( $(left) - ${RESERVE:-200} ))
  if [ "$t" -gt 30 ]; then
    timeout "$t" ./build/gpu/tests/tidal_tests --gtest_filter="${GTEST_FILTER:-*}" > "$out/cpp_tests.log" 2>&1 || failed=1
    tail -3 "$out/cpp_tests.log"
    grep -E "^\[  FAILED|Failure" "$out/cpp_tests.log" | sort -u | head -20 || true
    echo "tests done at ${SECONDS}s"
    # The model tests again under each of TEST_ENVS (ENV=VALUE joined by '+').
    for v in ${TEST_ENVS:-}; do
      timeout 90 env ${v//+/ } ./build/gpu/tests/tidal_tests --gtest_filter='*CudaModel*' > "$out/cpp_variant.log" 2>&1 || failed=1
      echo "$v: $(tail -1 "$out/cpp_variant.log")"; grep -E "^\[  FAILED" "$out/cpp_variant.log" | head -5 || true
    done
  else
    echo "tests: no time left"; failed=1
  fi
fi
: > "$out/step.jsonl"
for rep in $(seq "${STEP_REPS:-2}"); do
  for v in ${STEP_ENVS:--}; do
    [ "$(left)" -gt 40 ] || { echo "step $v: no time left"; break 2; }
    e=${v//+/ }; [ "$v" = - ] && e=
    env $e timeout "$(left)" ./build/gpu/tests/bench/tidal_bench_cuda --only-step --weights bf16 --stamps ${STEP_ARGS:---default-only} \
      | python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d = json.loads(l); d["env"] = sys.argv[1]; d["rep"] = int(sys.argv[2]); print(json.dumps(d))' "$v" "$rep" \
      >> "$out/step.jsonl" || failed=1
  done
done
python3 - "$out/step.jsonl" > "$out/step_summary.txt" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["bench"] == "decode_step":
        print(f'rep {d["rep"]} {d["env"]:28s} graphs={d["graphs"]:d} pdl={d["pdl"]:d} fused={d["fused_decode"]:d} '
              f'gpu {d["gpu_ms"]:.4f} ms = {d["gpu_ratio_to_bandwidth_time"]:.3f}x of {d["bytes_at_measured_bw_ms"]:.3f} ms; wall {d["ms"]:.3f}')
    elif d["bench"] == "decode_step_stamps":
        print(f'rep {d["rep"]} {d["env"]:28s} stamps: {d["kernels"]} kernels, first-to-last release {d["first_to_last_release_us"]:.1f} us')
        for name, n, tot in d["by_kernel"][:14]:
            print(f'    {name:48s} x{n:3d} {tot:8.1f} us')
        marked = {}  # kernels that mark their stages: mean share, lead and marks over the step
        for row in d["timeline"]:
            if len(row) > 5:
                marked.setdefault(row[0], []).append(row)
        for name, rows in marked.items():
            mean = lambda xs: sum(xs) / len(xs)
            marks = [round(mean([r[5][j] for r in rows if len(r[5]) > j]), 2) for j in range(len(rows[0][5]))]
            print(f'    marks {name:42s} x{len(rows):3d} share {mean([r[3] for r in rows]):.2f} lead {mean([r[4] for r in rows]):.2f} marks {marks}')
PY
cat "$out/step_summary.txt"
b=./build/gpu/tests/bench/tidal_bench_experts
# EXPERT_ENVS: settings of the expert runs (ENV=VALUE joined by '+', "-" for the defaults),
# interleaved per round; each JSON line gets "env" and "rep".
for rep in $(seq "${EXPERT_REPS:-3}"); do
  for v in ${EXPERT_ENVS:--}; do
    [ "$(left)" -gt 25 ] || { echo "experts: no time left"; break 2; }
    e=${v//+/ }; [ "$v" = - ] && e=
    env $e timeout "$(left)" "$b" --shape 35b --m 1 --threads "$(nproc)" --dtypes int4,int8 --seconds 1 \
      | python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d = json.loads(l); d["env"] = sys.argv[1]; d["rep"] = int(sys.argv[2]); print(json.dumps(d))' "$v" "$rep" || failed=1
  done
done > "$out/experts.jsonl"
python3 - "$out/experts.jsonl" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        if d["bench"] == "moe_experts":
            print(f'experts rep {d.get("rep")} {d.get("env", "-")} {d["dtype"]} m=1 {d["threads"]} threads {d["median_us"]:.1f} us {d["bw_fraction"]:.3f} of {d["read_bw_gbps"]:.0f} GB/s')
PY
# PY_ENVS: tests/python/test_cuda.py (golden fixtures on device="cuda") under each entry, in the
# time left (needs "_tidal" in NINJA_TARGETS).
for v in ${PY_ENVS:-}; do
  t=$(( $(left) - 5 ))
  [ "$t" -gt 60 ] || { echo "test_cuda.py $v: no time left"; break; }
  e=${v//+/ }; [ "$v" = - ] && e=
  (cd tests/python && env $e PYTHONPATH="$PWD/../../python" timeout "$t" python3 -m pytest -q -x -p no:cacheprovider \
    test_cuda.py > "$out/pytest_cuda.log" 2>&1) || failed=1
  echo "test_cuda.py [$v]: $(tail -1 "$out/pytest_cuda.log")"
  grep -E "^FAILED|^E  " "$out/pytest_cuda.log" | head -10 || true
done
echo "done at ${SECONDS}s"
exit $failed
