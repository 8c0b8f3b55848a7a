#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Loading what users download, on the GPU test machine (issue: GGUF and FP8): the real-shape
# Qwen3.6-35B-A3B as llama.cpp's Q4_K_M mix (tidal.gguf, experts regenerated from tidal.synth's
# seeds) and in the official FP8 layout (tidal.synth --expert-dtype fp8), each loaded by
# tidal.Runtime.load with device cuda, a 12 GiB VRAM cap and 16 threads: load time, resident memory
# (peak and after load), and pp512 / tg64 from tidal.bench (its JSON "load" and "results").
#
#   TIDAL_COMMIT=$(git rev-parse --short HEAD) STEPS="build tests q4km fp8" bash tests/bench/run_device_load.sh
#
# STEPS: build (tests/bench/run_device_cuda.sh's CUDA build), tests (C++ expert-format tests with AMX,
# the GGUF/FP8 Python tests with CUDA), q4km, fp8. GROUPS (default "32"): expert group sizes to bench
# the Q4_K_M file with (32 is Runtime.load's choice for GGUF; 128 runs prefill on AMX). Peak disk:
# 21 GB (INT4 synth, for its dense tensors and seeds) + 21 GB (GGUF), then 35 GB (FP8). Output in $OUT.
set -euo pipefail
mkdir -p "${OUT:-bench-out}"
out=$(cd "${OUT:-bench-out}" && pwd)
steps=${STEPS:-build tests q4km fp8}
threads=${THREADS:-16}
work=${WORK:-/tmp/tidal-load}
mkdir -p "$work"
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
export PYTHONPATH=$PWD/python
# The `gguf` package (reference decoder for the tests), carried as a wheel: the machine is offline.
if ls .devcarry/gguf-*.whl >/dev/null 2>&1 && ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --target /tmp/pylib .devcarry/gguf-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/pylib
fi
failed=0
if [[ $steps == *build* ]]; then
  STEPS=build OUT="$out" bash tests/bench/run_device_cuda.sh
fi
if [[ $steps == *tests* ]]; then
  ./build/gpu/tests/tidal_tests --gtest_filter='ExpertFormat.*:MoeExperts.*:ExpertGemm.*' > "$out/cpp_formats.log" 2>&1 || failed=1
  tail -1 "$out/cpp_formats.log"; grep -E "^\[  FAILED" "$out/cpp_formats.log" | head || true
  (cd tests/python && python3 -m pytest -q -p no:cacheprovider -rs test_gguf_load.py test_fp8.py test_gguf.py \
    > "$out/pytest_load.log" 2>&1) || failed=1
  tail -3 "$out/pytest_load.log"; grep -E "^FAILED|^E  " "$out/pytest_load.log" | head -20 || true
fi
bench() {  # MODEL NAME [extra tidal.bench args]
  local model=$1 name=$2; shift 2
  sync
  python3 -m tidal.bench "$model" --device cuda --gpu-memory 12GiB --cpu-threads "$threads" \
    -p 512 -n 64 -r 2 --json "$out/load_$name.json" "$@" > "$out/load_$name.txt" 2>&1 || { tail -20 "$out/load_$name.txt"; failed=1; }
  python3 - "$out/load_$name.json" <<'PY' || true
import json, sys
j = json.load(open(sys.argv[1])); l = j["load"]
print(f"{sys.argv[1]}: load {l['seconds']:.1f}s peak RSS {l['peak_rss_bytes']/2**30:.1f} GiB RSS {l.get('vmrss_bytes', 0)/2**30:.1f} GiB "
      f"(anon {l.get('rssanon_bytes', 0)/2**30:.1f}) experts {l['expert_bytes']/2**30:.1f} GiB from {l['expert_source']} as "
      f"{j['caps']['expert_dtype']} g{j['caps']['expert_group_size']}; " +
      ", ".join(f"{r['test']} {r['tok_s_median']:.1f} tok/s" for r in j["results"]))
PY
}
if [[ $steps == *q4km* ]]; then
  int4=$work/int4 g=$work/Qwen3.6-35B-A3B-Q4_K_M.gguf
  [ -f "$g" ] || {
    [ -f "$int4/config.json" ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --expert-dtype int4 "$int4" 2>/dev/null
    t0=$(date +%s); python3 -m tidal.gguf "$int4" "$g" --expert-type q4_k_m 2>/dev/null
    echo "converted in $(( $(date +%s) - t0 ))s: $(du -h "$g" | cut -f1)"
    rm -rf "$int4"; }
  for grp in ${GROUPS:-32}; do bench "$g" "q4km_g$grp" --expert-group-size "$grp"; done
  rm -f "$g"
fi
if [[ $steps == *fp8* ]]; then
  f=$work/Qwen3.6-35B-A3B-FP8
  [ -f "$f/config.json" ] || { t0=$(date +%s); python3 -m tidal.synth --preset qwen3.6-35b-a3b --expert-dtype fp8 "$f" 2>/dev/null
    echo "written in $(( $(date +%s) - t0 ))s: $(du -sh "$f" | cut -f1)"; }
  bench "$f" fp8
fi
exit $failed
