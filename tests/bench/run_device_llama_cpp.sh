#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# tidal and llama.cpp side by side on the GPU test machine, on the same synthetic model.
#
#   LLAMA_SRC=<llama.cpp tree or .tar.xz> bash tests/bench/run_device_llama_cpp.sh
#
# 1. build: tidal with CUDA (tests/bench/run_device_cuda.sh's build) and llama.cpp's llama-bench and
#    llama-completion with CUDA, from LLAMA_SRC (default .devcarry/llama.cpp-src.tar.xz, made by
#    tests/bench/pack_llama_cpp.sh: the source is not committed); or, where LLAMA_BIN (default
#    .devcarry/llama.cpp-bin.tar.xz, made by tests/bench/build_llama_cpp_bin.sh) exists, those
#    programs prebuilt, unpacked instead of compiled.
# 2. check: llama.cpp runs tidal-mini converted by tidal.gguf and continues a prompt exactly as tidal
#    does (tests/python/test_llama_cpp.py), so both engines run the same model.
# 3. bench: tidal.synth writes the Qwen3.6-35B-A3B shape (LAYERS layers, default 8, real width) as
#    BF16 safetensors; tidal.gguf writes the same weights as GGUF with Q4_K and Q8_0 experts (BF16
#    dense weights, like tidal's GPU copy). llama-bench runs each with every routed expert on the CPU
#    (-ot exps=CPU) and everything else on the GPU; tidal.bench runs the checkpoint with device cuda,
#    a 12 GiB VRAM cap, INT4 / INT8 experts. Same threads (THREADS, default 16), same tests (pp512,
#    pp8192, tg128, 3 repetitions after a warm-up). tests/bench/side_by_side.py prints the table.
# 4. full depth (STEPS "full4", "full8l", "full8t"; each fits one 10-minute device call): the 40-layer
#    model does not fit the 64 GiB disk in BF16 (70 GB), so tidal.synth writes it with pre-packed
#    INT4 experts (21 GB) and tidal.gguf regenerates its experts from their seeds for the GGUF; the
#    INT8 class reuses the dense tensors for the Q8_0 GGUF (41 GB), then tidal's INT8 model is written
#    once that GGUF is gone. Peak disk ~45 GB.
# TIDAL_BENCH_ARGS are added to tidal.bench's (e.g. "--gpu-expert-slots auto"); TIDAL_CUDA_* switches
# (e.g. TIDAL_CUDA_PREFILL_STREAM=1) pass through the environment.
# STEPS (default "build check bench") selects parts. Output in $OUT (or ./bench-out). Pass
# TIDAL_COMMIT=$(git rev-parse --short HEAD) from the checkout you run: the results record it (a
# copied tree's git metadata may lag). llama.cpp is built outside this tree (LLAMA_SRC_DIR, default
# /tmp/llama-src) so its build does not take tidal's git commit for its own; the packed source
# carries the version it came from (SOURCE.txt, copied to $OUT/llama_source.txt).
set -euo pipefail
mkdir -p "${OUT:-bench-out}"
out=$(cd "${OUT:-bench-out}" && pwd)
# The device tool returns at most 8 files from $OUT (the first 8 by name): everything also goes
# into one archive named to come first, at exit and when a timeout stops the script.
pack_out() { tar -czf "$out/0-all.tar.gz" -C "$out" --exclude=0-all.tar.gz . 2>/dev/null || true; }
trap pack_out EXIT
trap 'pack_out; exit 143' TERM
steps=${STEPS:-build check bench}
layers=${LAYERS:-8}
threads=${THREADS:-16}
reps=${REPS:-3}
prompts=${PROMPTS:-512,8192}
work=${WORK:-/tmp/tidal-side-by-side}
mkdir -p "$work"
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH="$PATH:$d"; done
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
llama=build/llama/bin
# The prebuilt llama.cpp's shared libraries sit beside its programs (its RUNPATH names the build
# machine's tree); the CPU and CUDA backends are loaded from there at run time.
export LD_LIBRARY_PATH=$PWD/$llama:$LD_LIBRARY_PATH
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d
done
if [[ $steps == *build* ]] && [ -f "${LLAMA_BIN:-.devcarry/llama.cpp-bin.tar.xz}" ]; then
  # llama.cpp prebuilt on the development machine (tests/bench/build_llama_cpp_bin.sh): unpacked,
  # not compiled here.
  STEPS=build OUT="$out" bash tests/bench/run_device_cuda.sh
  rm -rf build/llama && mkdir -p build/llama
  tar -xJf "${LLAMA_BIN:-.devcarry/llama.cpp-bin.tar.xz}" -C build/llama
  cp build/llama/bin/SOURCE.txt "$out/llama_source.txt"
  echo "llama.cpp prebuilt: $(head -1 "$out/llama_source.txt")"
  # Its CUDA backend must load (else llama-bench would quietly run on the CPU alone).
  build/llama/bin/llama-bench --list-devices > "$out/llama_devices.txt" 2>&1 || true
  grep -q "CUDA0" "$out/llama_devices.txt" || { echo "llama.cpp's CUDA backend did not load:"; cat "$out/llama_devices.txt"; exit 1; }
  grep -i -E "cuda|cpu" "$out/llama_devices.txt" | head -3
elif [[ $steps == *build* ]]; then
  STEPS=build OUT="$out" bash tests/bench/run_device_cuda.sh
  src=${LLAMA_SRC:-.devcarry/llama.cpp-src.tar.xz}
  if [ -f "$src" ]; then
    sdir=${LLAMA_SRC_DIR:-/tmp/llama-src}
    [ -d "$sdir/llama.cpp" ] || { mkdir -p "$sdir" && tar -xJf "$src" -C "$sdir"; }
    src=$sdir/llama.cpp
  fi
  [ -f "$src/CMakeLists.txt" ] || { echo "LLAMA_SRC=$src is not a llama.cpp tree"; exit 1; }
  cmake -S "$src" -B build/llama -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" -DGGML_NATIVE=ON -DGGML_CUDA_NCCL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    > "$out/llama_build.log" 2>&1 || { tail -30 "$out/llama_build.log"; exit 1; }
  ninja -C build/llama llama-bench llama-completion llama-quantize >> "$out/llama_build.log" 2>&1 \
    || { grep -E "error|FAILED" -A5 "$out/llama_build.log" | head -40; exit 1; }
  cp "$src/SOURCE.txt" "$out/llama_source.txt" 2>/dev/null || echo "unknown source" > "$out/llama_source.txt"
  echo "llama.cpp built from: $(cat "$out/llama_source.txt")"
fi
if [[ $steps == *check* ]]; then
  (cd tests/python && TIDAL_LLAMA_CPP_BIN="$PWD/../../$llama" PYTHONPATH="$PWD/../../python" \
    python3 -m pytest -q -p no:cacheprovider -rs test_gguf.py test_llama_cpp.py > "$out/pytest_gguf.log" 2>&1) || true
  tail -3 "$out/pytest_gguf.log"; grep -E "^FAILED|^E  " "$out/pytest_gguf.log" | head -20 || true
fi
export PYTHONPATH=$PWD/python
run_llama() {  # GGUF, tag
  sync  # files just written are flushed before anything is timed
  # llama.cpp at its best: weights loaded into pinned host buffers (-lm none; with mmap its prompt
  # processing copies experts to the GPU from pageable memory, 3-5x slower), each micro-batch of
  # UBATCH (default 512,2048,8192; a whole 8K prompt in one micro-batch crosses PCIe with each
  # layer's experts once, as tidal's 8192-token streaming chunk does) in its own llama-bench run
  # with its own VRAM trace (nvidia-smi every 200 ms), so that side_by_side.py can pick the fastest
  # micro-batch within the cap as well as the fastest overall. UBATCH_FULL (default: the first of
  # UBATCH) runs every test; the others run the prompts of UB_PROMPTS (default 8192) only.
  local ubs=${UBATCH:-512,2048,8192} full first=1 rows=()
  full=${UBATCH_FULL:-${ubs%%,*}}
  for ub in ${ubs//,/ }; do
    local tests=(-p "$prompts" -n 128)
    [ "$ub" = "$full" ] || tests=(-p "${UB_PROMPTS:-8192}" -n 0)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/vram_llama_$2_ub$ub.txt" &
    local poll=$!
    "$llama"/llama-bench -m "$1" "${tests[@]}" -r "$reps" -t "$threads" -ngl 99 -ot "exps=CPU" -fa on \
      -lm none -b 8192 -ub "$ub" -o json > "$out/llama_$2_ub$ub.json" 2> "$out/llama_$2_ub$ub.log" \
      || tail -20 "$out/llama_$2_ub$ub.log"
    kill $poll || true
    grep -q '"backends": "CUDA' "$out/llama_$2_ub$ub.json" || echo "WARNING: llama-bench did not run with its CUDA backend (ub $ub)"
    rows+=("$out/llama_$2_ub$ub.json")
  done
  # One JSON list for side_by_side.py, each row with the VRAM peak over idle of its own run.
  python3 - "$out/llama_$2.json" "${rows[@]}" <<'PY'
import json, pathlib, sys
rows = []
for f in sys.argv[2:]:
    p = pathlib.Path(f)
    try:
        rs = json.loads(p.read_text())
    except (OSError, ValueError):
        continue
    v = pathlib.Path(str(p).replace("/llama_", "/vram_llama_").replace(".json", ".txt"))
    try:
        vals = [float(x) for x in v.read_text().split() if x.strip()]
    except (OSError, ValueError):
        vals = []
    for r in rs:
        if len(vals) > 1:
            r["vram_peak_over_idle_gib"] = (max(vals) - vals[0]) / 1024
        rows.append(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
PY
  cat "$out"/vram_llama_$2_ub*.txt > "$out/vram_llama_$2.txt" 2>/dev/null || true
}
run_tidal() {  # model dir, expert dtype
  sync
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/vram_tidal_$2.txt" &
  local poll=$!
  python3 -m tidal.bench "$1" --device cuda --gpu-memory 12GiB --cpu-threads "$threads" \
    --expert-dtype "$2" -p "$prompts" -n 128 -r "$reps" ${TIDAL_BENCH_ARGS:-} --json "$out/tidal_$2.json" \
    > "$out/tidal_$2.txt" 2>&1 || tail -20 "$out/tidal_$2.txt"
  kill $poll || true
  tail -8 "$out/tidal_$2.txt"
}
full=$work/full
if [[ $steps == *full4* ]]; then
  rm -rf "$work"/*L* ; mkdir -p "$full"
  [ -f "$full/int4/config.json" ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --expert-dtype int4 "$full/int4" 2>/dev/null
  [ -f "$full/q4_k.gguf" ] || python3 -m tidal.gguf "$full/int4" "$full/q4_k.gguf" --expert-type q4_k 2>/dev/null
  df -h "$full" | tail -1
  run_llama "$full/q4_k.gguf" q4_k
  run_tidal "$full/int4" int4
  rm -f "$full/q4_k.gguf"
fi
if [[ $steps == *full8l* ]]; then
  rm -f "$full"/int4/experts-*.tidal  # the Q8_0 GGUF needs only the dense tensors and the seed
  [ -f "$full/q8_0.gguf" ] || python3 -m tidal.gguf "$full/int4" "$full/q8_0.gguf" --expert-type q8_0 2>/dev/null
  df -h "$full" | tail -1
  run_llama "$full/q8_0.gguf" q8_0
  rm -f "$full/q8_0.gguf"
fi
if [[ $steps == *full8t* ]]; then
  rm -f "$full/q8_0.gguf"
  [ -f "$full/int8/config.json" ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --expert-dtype int8 "$full/int8" 2>/dev/null
  run_tidal "$full/int8" int8
fi
if [[ $steps == *bench* ]]; then
  model=$work/qwen3.6-35b-a3b-L$layers
  [ -f "$model/config.json" ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --layers "$layers" "$model" 2>/dev/null
  sync  # written checkpoints flushed before anything is timed
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
  for pair in int4:q4_k int8:q8_0; do
    td=${pair%%:*}; q=${pair##*:}
    g=$work/model-L$layers-$q.gguf
    [ -f "$g" ] || python3 -m tidal.gguf "$model" "$g" --expert-type "$q" 2>/dev/null
    run_llama "$g" "$q"
    run_tidal "$model" "$td"
  done
  python3 tests/bench/side_by_side.py "$out" | tee "$out/side_by_side.md"
fi
