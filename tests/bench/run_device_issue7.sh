#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 7's open measurements on the GPU test machine, in parts (run them back to back: a warm
# machine keeps build/gpu and /tmp, so later parts skip the build and the model). One call each:
# "build tests model probe", "tg route", "pp", "q80" (each bench is cut at BENCH_TIMEOUT, 190 s). STEPS (default "build tests model probe"; in this order):
#   build  tidal with CUDA (run_device_cuda.sh's build: _tidal and the C++ tests)
#   tests  the CUDA C++ tests (*Cuda*, *ExpertStore*) and tests/python/test_cuda.py (VRAM expert
#          cache, prefill expert streaming), with their [cuda-measure] lines
#   model  the 40-layer Qwen3.6-35B-A3B shape with pre-packed INT4 experts (/tmp/m40, 21 GB)
#   profile  tests/bench/profile_prefill.py: GPU time per op of an 8192-token streamed prefill
#   probe  tests/bench/cache_probe.py on it: Runtime.load with the VRAM expert cache (SLOTS,
#          default auto) and 256 decode steps, under a 240 s limit (the start hung before the
#          store was copied out of its file mapping)
#   tg     tidal.bench tg128 with the cache (auto slots) and without (NOCACHE= leaves it out), then
#          with the cache and lookahead prefetch of each of PREFETCH (e.g. "2 4"; default none)
#   route  tidal.bench tg128 through the cache (auto slots) on synthetic routing: uniform, then
#          skewed and temporally correlated (Zipf 1.0, reuse 0.5), the latter also with 64 copies
#          in flight (TIDAL_CUDA_EXPERT_FILLS): issue 7's hit-rate line; then tg64 with the router
#          lookahead on (--router-lookahead 0): its precision and recall
#   pp     tidal.bench pp512 and pp8192 with prefill expert streaming (TIDAL_CUDA_PREFILL_STREAM=1,
#          chunks of each of STREAM_CHUNKS, default "4096 8192"; prompts from STREAM_MIN, default 512
#          tokens; each delta-rule kernel of DELTA_CHUNKED, default "0") and with the experts on the
#          host (PP_HOST=0 leaves that out)
#   q80    the Qwen3-Next-80B-A3B shape (48 layers, 512 experts, INT4 pre-packed: 45 GB, written to
#          /tmp/q80 after /tmp/m40 is removed: the disk is 64 GB) loaded under the same caps,
#          tidal.bench pp512 and tg128 with the expert cache
# Output (text and JSON) in $OUT.
set -euo pipefail
mkdir -p "${OUT:-bench-out}"
out=$(cd "${OUT:-bench-out}" && pwd)
# The device tool returns at most 8 files from $OUT (the first 8 by name): everything also goes
# into one archive named to come first, at exit and when a timeout stops the script.
pack_out() { tar -czf "$out/0-all.tar.gz" -C "$out" --exclude=0-all.tar.gz . 2>/dev/null || true; }
trap pack_out EXIT
trap 'pack_out; exit 143' TERM
steps=${STEPS:-build tests model probe}
failed=0
m=${MODEL:-/tmp/m40}
bench() {  # name, then tidal.bench arguments
  local name=$1
  shift
  TIDAL_EXECUTOR=spin timeout "${BENCH_TIMEOUT:-190}" python3 -m tidal.bench "$m" --device cuda \
    --gpu-memory 12GiB --cpu-threads 15 --expert-dtype int4 -r 3 "$@" --json "$out/$name.json" \
    > "$out/$name.txt" 2>&1 || { failed=1; tail -5 "$out/$name.txt"; }
  echo "== $name ($SECONDS s)"
  grep -E "^\| (pp|tg)|GPU step time measured" "$out/$name.txt" || true
  python3 - "$out/$name.json" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    if r.get("expert_cache"):
        print("expert cache:", r["test"], r["expert_cache"])
print("gpu memory:", d.get("gpu_memory"))
EOF
}
if [[ $steps == *build* ]]; then
  STEPS=build NINJA_TARGETS="tidal_tests _tidal" OUT="$out" bash tests/bench/run_device_cuda.sh \
    > "$out/build_steps.log" 2>&1 || { tail -30 "$out/build_steps.log"; exit 1; }
  echo "built ($SECONDS s)"
fi
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/python
if [[ $steps == *tests* ]]; then
  timeout 200 ./build/gpu/tests/tidal_tests --gtest_filter='*Cuda*:*ExpertStore*' \
    > "$out/cpp_tests.log" 2>&1 || failed=1
  tail -1 "$out/cpp_tests.log"; grep -E "^\[  FAILED|Failure" "$out/cpp_tests.log" | sort -u | head -20 || true
  # test_cuda.py under each delta-rule kernel of DELTA_CHUNKED (default "0")
  for dc in ${DELTA_CHUNKED:-0}; do
    (cd tests/python && TIDAL_CUDA_DELTA_CHUNKED=$dc timeout 300 python3 -m pytest -q -s -p no:cacheprovider \
      test_cuda.py > "$out/pytest_cuda_dc$dc.log" 2>&1) || failed=1
    echo "pytest test_cuda.py, TIDAL_CUDA_DELTA_CHUNKED=$dc: $(tail -1 "$out/pytest_cuda_dc$dc.log") ($SECONDS s)"
    grep -E "^FAILED|^E  |cuda-measure\] (vram|prefill)" "$out/pytest_cuda_dc$dc.log" | cut -c1-400 | head -30 || true
  done
fi
if [[ $steps == *model* ]] && [ ! -f "$m/config.json" ]; then
  python3 -m tidal.synth --preset qwen3.6-35b-a3b --layers 40 --expert-dtype int4 "$m" > "$out/synth.log" 2>&1 \
    || { tail -20 "$out/synth.log"; exit 1; }
  echo "model written ($SECONDS s)"
fi
if [[ $steps == *probe* ]]; then
  python3 tests/bench/cache_probe.py "$m" --slots "${SLOTS:-auto}" --steps 256 > "$out/probe.log" 2>&1 &
  pid=$!
  for t in $(seq 1 240); do
    kill -0 $pid 2>/dev/null || break
    sleep 1
    # Still loading after 90 s: where its threads are (the cache's start hung once).
    if [ "$t" = 90 ] && ! grep -q '"phase": "load"' "$out/probe.log"; then
      echo "probe: no load after 90 s"; python3 tests/bench/proc_stacks.py $pid || true
    fi
  done
  kill $pid 2>/dev/null && { echo "probe killed at 240 s"; failed=1; } || wait $pid || failed=1
  cut -c1-600 "$out/probe.log"
  echo "probe done ($SECONDS s)"
fi
if [[ $steps == *profile* ]]; then
  # GPU time per op of an 8192-token prefill, streamed in one chunk (tests/bench/profile_prefill.py),
  # for each TIDAL_CUDA_DELTA_CHUNKED value in DELTA_CHUNKED (default "0"; "0 1" compares the
  # delta-rule kernels where the chunked one exists).
  for dc in ${DELTA_CHUNKED:-0}; do
    TIDAL_CUDA_DELTA_CHUNKED=$dc TIDAL_CUDA_PROFILE=1 TIDAL_CUDA_PREFILL_STREAM=1 TIDAL_CUDA_STREAM_CHUNK=8192 \
      TIDAL_CUDA_STREAM_MIN_TOKENS=512 TIDAL_EXECUTOR=spin timeout 150 python3 tests/bench/profile_prefill.py "$m" \
      --tokens 8192 --cpu-threads 15 --expert-dtype int4 > "$out/profile8192_dc$dc.txt" 2>&1 || failed=1
    echo "-- TIDAL_CUDA_DELTA_CHUNKED=$dc"
    sed -n '/^rep 1/,$p' "$out/profile8192_dc$dc.txt" | head -8
  done
  echo "profile done ($SECONDS s)"
fi
if [[ $steps == *tg* ]]; then
  bench tg_cache -p 512 -n 128 --gpu-expert-slots auto
  [ -n "${NOCACHE-1}" ] && bench tg_nocache -p 512 -n 128 --gpu-expert-slots 0
  # Lookahead prefetch (Note [Lookahead prefetch]): PREFETCH experts per layer, each of the list
  for pf in ${PREFETCH:-}; do
    TIDAL_CUDA_EXPERT_PREFETCH=$pf bench "tg_cache_pf$pf" -p 512 -n 128 --gpu-expert-slots auto
  done
fi
if [[ $steps == *route* ]]; then
  bench route_uniform -p 512 -n 128 --gpu-expert-slots auto --routing-skew 0 --routing-reuse 0
  bench route_skewed -p 512 -n 128 --gpu-expert-slots auto --routing-skew 1.0 --routing-reuse 0.5
  # 64 copies in flight instead of 16: the simulator's 55.7% -> 80.0% GPU share on this trace
  TIDAL_CUDA_EXPERT_FILLS=64 bench route_skewed_fills64 -p 512 -n 128 --gpu-expert-slots auto \
    --routing-skew 1.0 --routing-reuse 0.5
  # The router lookahead's precision and recall on the model's own (random-weight) routers: traces
  # override the routers, so prediction is measured on the free run.
  bench route_lookahead -p 512 -n 64 --gpu-expert-slots auto --router-lookahead 0
  grep "router lookahead" "$out/route_lookahead.txt" || true
fi
if [[ $steps == *pp* ]]; then
  for dc in ${DELTA_CHUNKED:-0}; do
    for c in ${STREAM_CHUNKS:-4096 8192}; do
      TIDAL_CUDA_DELTA_CHUNKED=$dc TIDAL_CUDA_PREFILL_STREAM=1 TIDAL_CUDA_STREAM_CHUNK=$c \
        TIDAL_CUDA_STREAM_MIN_TOKENS=${STREAM_MIN:-512} bench pp_stream${c}_dc$dc -p 512,8192 -n 16
    done
  done
  [ "${PP_HOST:-1}" = 0 ] || TIDAL_CUDA_PREFILL_STREAM=0 bench pp_host -p 512,8192 -n 16
fi
if [[ $steps == *auto* ]]; then  # the defaults (streaming chosen at load) against streaming off
  bench auto -p 512,8192 -n 128
  grep "prefill expert streaming" "$out/auto.txt" || true
  TIDAL_CUDA_PREFILL_STREAM=0 bench stream_off -p 512,8192 -n 128
fi
if [[ $steps == *q80* ]]; then
  rm -rf /tmp/m40  # the disk holds one of the two
  [ -f /tmp/q80/config.json ] || python3 -m tidal.synth --preset qwen3-next-80b-a3b --expert-dtype int4 /tmp/q80 \
    > "$out/synth80.log" 2>&1 || { tail -20 "$out/synth80.log"; exit 1; }
  echo "80B written ($SECONDS s)"
  m=/tmp/q80 bench q80_cache -p 512 -n 128 --gpu-expert-slots auto
fi
exit $failed
