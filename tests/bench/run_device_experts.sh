#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CPU expert engine on the GPU test machine (Xeon with AMX, no network): build the kernels, the C++
# tests and tidal_bench_experts (with the oneDNN baseline), run the C++ tests (AMX included) and
# the Python tests on the AMX paths, the benchmark on the Qwen3.6-35B-A3B and Qwen3-Next-80B-A3B
# expert shapes, and KTransformers' kt-kernel on the same shapes. Logs and JSON lines go to $OUT
# (or ./bench-out); the exit status is non-zero when a test failed.
#
# What that machine lacks travels in .devcarry/deps.tar.xz (see tests/bench/make_devcarry.sh):
# TBB (PyPI wheels), oneDNN 2.6 + its OpenCL loader (Debian .debs), the kt-kernel wheel; and, where
# it exists, .devcarry/onednn3.tar.xz (tests/bench/build_onednn3.sh) for a oneDNN 3 baseline.
# STEPS (default "tests python bench kt") selects parts; "decode" is the M = 1 comparison of the
# executors and of the per-expert hand-off (Note [Spinning workers], Note [Per-expert hand-off]);
# "trace" the per-thread timeline of M = 1 calls (tidal_bench_experts --trace); "prefill" the AMX
# prefill (with ONEDNN=1, next to oneDNN's matmul); "probe" the AMX stage probe on core 0 alone and
# with the other cores streaming memory (tidal_amx_probe [groups] [loaded]); "avx2" the AVX2 kernels
# (TIDAL_CPU_ISA=avx2: the path of CPUs without AVX-512) at M = 1 on 1, 4 and all threads.
set -euo pipefail
mkdir -p "${OUT:-bench-out}" /tmp/deps
out=$(cd "${OUT:-bench-out}" && pwd)
steps=${STEPS:-tests python bench kt}
failed=0
tar -xJf .devcarry/deps.tar.xz -C /tmp/deps
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
threads=${THREADS:-$(nproc)}
log=/tmp/tidal-device-build.log
# oneDNN 3 for the prefill baseline where .devcarry/onednn3.tar.xz exists (build_onednn3.sh);
# otherwise Debian's oneDNN 2.6 from deps.tar.xz.
dnnl=()
if [ -f .devcarry/onednn3.tar.xz ]; then
  mkdir -p /tmp/onednn3 && tar -xJf .devcarry/onednn3.tar.xz -C /tmp/onednn3
  dnnl=(-DTIDAL_DNNL_INCLUDE=/tmp/onednn3/include -DTIDAL_DNNL_LIBRARY=/tmp/onednn3/lib/libdnnl.so)
  export LD_LIBRARY_PATH=/tmp/onednn3/lib:$LD_LIBRARY_PATH
  head -1 /tmp/onednn3/SOURCE.txt
fi
cmake -S . -B build/bench -G Ninja -DTIDAL_CUDA=OFF -DTIDAL_BUILD_TESTS=ON -DTIDAL_BUILD_BENCHMARKS=ON \
  -DTIDAL_BUILD_PYTHON=OFF -DCMAKE_PREFIX_PATH=/tmp/deps "${dnnl[@]}" > "$log" 2>&1 || { tail -30 "$log"; exit 1; }
targets=(tidal_tests tidal_bench_experts)
[[ $steps == *probe* ]] && targets+=(tidal_amx_probe)
ninja -C build/bench "${targets[@]}" >> "$log" 2>&1 || { tail -30 "$log"; exit 1; }
echo "built in ${SECONDS}s"
if [[ $steps == *tests* ]]; then
  ./build/bench/tests/tidal_tests --gtest_filter="${GTEST_FILTER:-*}" > "$out/cpp_tests.log" 2>&1 || failed=1
  tail -3 "$out/cpp_tests.log"; grep -E "^\[  FAILED|SKIPPED \]" "$out/cpp_tests.log" | sort -u || true
fi
if [[ $steps == *python* ]]; then
  python3 -m pip install -q --no-deps --no-build-isolation . -Cbuild-dir=build/py \
    -Ccmake.define.TIDAL_CUDA=OFF -Ccmake.define.CMAKE_PREFIX_PATH=/tmp/deps \
    -Ccmake.define.pybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  # The notebook test needs nbclient/ipykernel, which that machine lacks.
  (cd tests/python && python3 -m pytest -q -p no:cacheprovider -rs \
    --deselect test_notebook.py::test_quickstart_notebook_runs . > "$out/pytest.log" 2>&1) || failed=1
  tail -3 "$out/pytest.log" || true
  grep -E "^FAILED|Error" "$out/pytest.log" | head -20 || true
fi
b=./build/bench/tests/bench/tidal_bench_experts
if [[ $steps == *bench* ]]; then
  "$b" --micro --dtypes int8,int4,bf16 --m 1,4,8,16,32,64 > "$out/micro.jsonl"
  "$b" --shape 35b --m 1 --threads 1,2,4,8,"$threads" --dtypes int4,int8,bf16 > "$out/decode_scaling.jsonl"
  "$b" --shape 35b --m 2048 --threads 1,4,"$threads" --dtypes int8 >> "$out/decode_scaling.jsonl"
  "$b" --shape 35b --m 1,4,16,128,512,2048 --threads "$threads" --dtypes int4,int8,bf16 --onednn > "$out/bench_35b.jsonl"
  # BF16 prefill on AMX is opt-in (kernels/cpu/expert_gemm_registry.cpp, Note [AMX BF16 is opt-in]).
  TIDAL_EXPERT_AMX_BF16=1 "$b" --shape 35b --m 16,128,512,2048 --threads "$threads" --dtypes bf16 > "$out/bench_35b_amx_bf16.jsonl"
  for rep in 1 2 3 4 5; do "$b" --shape 35b --m 1 --threads "$threads" --dtypes int4,int8 --seconds 1; done > "$out/decode_repeats.jsonl"
  "$b" --shape 80b --m 1,16,128,2048 --threads "$threads" --dtypes int4,int8,bf16 > "$out/bench_80b.jsonl"
fi
if [[ $steps == *decode* ]]; then
  for rep in 1 2 3; do
    "$b" --shape 35b --m 1 --threads "$threads" --dtypes int4,int8 --executors spin,tbb --dataflow 0,1 --seconds 1
  done > "$out/decode_executors.jsonl"
  "$b" --shape 80b --m 1 --threads "$threads" --dtypes int4,int8 --executors spin,tbb --dataflow 0,1 > "$out/decode_executors_80b.jsonl"
  for pf in ${PF_SWEEP:-}; do  # software prefetch distance (bytes) with the hand-off
    TIDAL_EXPERT_PREFETCH=$pf "$b" --shape 35b --m 1 --threads "$threads" --dtypes int4,int8 --seconds 1 \
      | sed "s/^{/{\"prefetch\":$pf,/"
  done > "$out/decode_prefetch.jsonl"
  [[ -n ${SCALING:-} ]] && "$b" --shape 35b --m 1,4,16 --threads 1,2,4,8,"$threads" --dtypes int4,int8 > "$out/decode_scaling_spin.jsonl"
  python3 - "$out"/decode_executors.jsonl "$out"/decode_executors_80b.jsonl "$out"/decode_prefetch.jsonl <<'PY'
import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        d = json.loads(line)
        if d["bench"] == "dispatch":
            print(f'dispatch {d["executor"]:5s} {d["threads"]} threads: {d["us_per_job"]} us/job')
        elif d["bench"] == "moe_experts":
            print(f'{d["shape"][:10]} {d["dtype"]} m={d["m"]} {d["executor"]:5s} flow={d["dataflow"]} pf={d.get("prefetch", "-")} '
                  f'{d["median_us"]:7.1f} us {d["bw_fraction"]:.3f} of {d["read_bw_gbps"]:.0f} GB/s '
                  f'phases {d["phase_us"]}')
PY
fi
if [[ $steps == *trace* ]]; then
  # M = 1 decode with the per-thread timeline of its calls (--trace), interleaved under each
  # entry of TRACE_ENVS (default: the defaults, and phase 2 items of 4 and 16 tiles; Note [Column
  # blocks finish the call]). TIDAL_BENCH_RUN=defaults is a placeholder that sets nothing.
  # TRACE_ENVS: one run per entry and repetition, each environment assignments joined by '+'.
  for rep in $(seq "${TRACE_REPS:-3}"); do
    for v in ${TRACE_ENVS:-TIDAL_BENCH_RUN=defaults TIDAL_EXPERT_DOWN_TILES=4 TIDAL_EXPERT_DOWN_TILES=16}; do
      env ${v//+/ } "$b" --shape ${TRACE_SHAPES:-35b,80b} --m 1 --threads "$threads" \
        --dtypes int4,int8 --seconds 1 --trace | sed "s/^{/{\"rep\":$rep,\"env\":\"$v\",/"
    done
  done > "$out/decode_trace.jsonl"
  python3 - "$out"/decode_trace.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["bench"] == "moe_experts":
        print(f'rep {d["rep"]} {d["env"]} {d["shape"][:10]} {d["dtype"]} {d["median_us"]:7.1f} us '
              f'{d["bw_fraction"]:.3f} of {d["read_bw_gbps"]:.0f} GB/s')
    elif d["bench"] == "decode_trace":
        sh = d["shares"]
        col = lambda k: [s[k] for s in sh]
        mx = lambda k: max(col(k))
        print(f'  trace: entry {d["entry_us"]:.1f} grouped {d["grouped_us"]:.1f} prepared {d["prepared_us"]:.1f} start {min(col(0)):.1f}-{mx(0):.1f} own_gu {min(col(1)):.1f}-{mx(1):.1f} '
              f'gu {min(col(2)):.1f}-{mx(2):.1f} wait max {mx(3):.1f} own_dn {min(col(4)):.1f}-{mx(4):.1f} '
              f'dn {min(col(5)):.1f}-{mx(5):.1f} barrier {mx(6):.1f} reduce {mx(7):.1f} '
              f'reduce_us max {mx(8):.1f} return {d["return_us"]:.1f} stolen {d["stolen_items"]:.0f}')
PY
fi
if [[ $steps == *prefill* ]]; then
  # AMX prefill: the late group epilogue against the previous order (TIDAL_AMX_LATE_EPILOGUE=0),
  # BF16 with bf16 activations against the hi + lo split (Note [AMX BF16 is opt-in]).
  # PREFILL_MICRO=0: the op alone (with ONEDNN=1, next to oneDNN), no micro calls and no late=0 op.
  : > "$out/prefill_micro.jsonl"
  [[ ${PREFILL_MICRO:-1} == 1 ]] && for late in 1 0; do
    for amx in bf16 split; do
      TIDAL_AMX_LATE_EPILOGUE=$late TIDAL_EXPERT_AMX_BF16=$amx "$b" --micro --dtypes int8,int4,bf16 \
        --m 16,32,64,128 | sed "s/^{/{\"late\":$late,\"amx_bf16\":\"$amx\",/"
    done
  done > "$out/prefill_micro.jsonl"
  # PREFILL_ENVS: one op run per entry and repetition (PREFILL_REPS, default 1), interleaved, each
  # environment assignments joined by '+' (TIDAL_BENCH_RUN=defaults sets nothing) or "-" for the
  # defaults; oneDNN (ONEDNN=1) runs with the
  # first entry of the first repetition only.
  : > "$out/prefill.jsonl"
  envs=${PREFILL_ENVS:--}
  for rep in $(seq "${PREFILL_REPS:-1}"); do
    for v in $envs; do
      dnn=
      [[ $rep == 1 && $v == "${envs%% *}" ]] && dnn=${ONEDNN:+--onednn}
      e=${v//+/ }
      [[ $v == - ]] && e=
      env $e TIDAL_EXPERT_AMX_BF16=bf16 "$b" --shape 35b --m ${PREFILL_M:-512,2048} --threads "$threads" \
        --dtypes "${PREFILL_DTYPES:-int8,int4,bf16}" $dnn \
        | sed "s/^{/{\"late\":1,\"amx_bf16\":\"bf16\",\"rep\":$rep,\"env\":\"$v\",/" >> "$out/prefill.jsonl"
    done
  done
  [[ ${PREFILL_MICRO:-1} == 1 ]] && TIDAL_AMX_LATE_EPILOGUE=0 TIDAL_EXPERT_AMX_BF16=split "$b" --shape 35b \
    --m 2048 --threads "$threads" --dtypes int8,int4,bf16 | sed 's/^{/{"late":0,"amx_bf16":"split",/' >> "$out/prefill.jsonl"
  python3 - "$out"/prefill_micro.jsonl "$out"/prefill.jsonl <<'PY'
import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        d = json.loads(line)
        if d["bench"] == "micro" and d["variant"].startswith("amx"):
            print(f'micro late={d["late"]} {d["variant"]:13s} m={d["m"]:3d} cold={d["cold"]} {d["us_per_call"]:7.2f} us {d["tflops"]:.3f} TFLOP/s')
        elif d["bench"] == "moe_experts":
            print(f'op rep={d.get("rep", 1)} env={d.get("env", "-")} late={d["late"]} {d["dtype"]} m={d["m"]} {d["kernels"]} {d["median_us"]:8.0f} us {d["tflops"]:.2f} TFLOP/s '
                  f'{d["roofline_fraction"]:.3f} of roofline {d["roofline_tflops"]:.1f} (bw {d["read_bw_gbps"]:.0f} GB/s, '
                  f'peak bf16 {d["amx_peak_bf16_tflops"]:.1f} int8 {d["amx_peak_int8_tops"]:.1f}) phases {d["phase_us"]}')
        elif d["bench"].startswith("onednn"):
            print("onednn", {k: d[k] for k in d if k not in ("bench",)})
PY
fi
if [[ $steps == *probe* ]]; then
  # Each stage of an AMX INT8 group on core 0, idle and while the other cores stream-read memory of
  # their own (the fifteenth session's plan for the prefill roofline).
  for loaded in 0 $((threads - 1)); do
    echo "== amx_probe loaded=$loaded"
    ./build/bench/tests/bench/tidal_amx_probe "${PROBE_GROUPS:-200000}" "$loaded" || failed=1
  done > "$out/amx_probe.txt" 2>&1
  tail -40 "$out/amx_probe.txt"
fi
if [[ $steps == *avx2* ]]; then
  # The AVX2 kernels (Note [AVX2 weight stream]) on this machine's memory system, next to the
  # default ISA in the same process order.
  for rep in 1 2; do
    for isa in avx2 auto; do
      TIDAL_CPU_ISA=$isa "$b" --shape 35b --m 1 --threads 1,4,"$threads" --dtypes int4,int8 --seconds 1 \
        | sed "s/^{/{\"rep\":$rep,\"cpu_isa\":\"$isa\",/" || failed=1
    done
  done > "$out/decode_avx2.jsonl"
  python3 - "$out"/decode_avx2.jsonl <<'PY' || failed=1
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    if d["bench"] == "moe_experts":
        print(f'rep={d["rep"]} isa={d["cpu_isa"]:4s} {d["kernels"]:16s} {d["threads"]:2d} threads {d["median_us"]:8.1f} us '
              f'{d["bw_fraction"]:.3f} of {d["read_bw_gbps"]:.0f} GB/s')
PY
fi
if [[ $steps == *kt* ]]; then
  # One layer per format: with two, kt-kernel 0.6.1 aborted ("free(): invalid pointer") here.
  # KT_BATCH=32 submits 32 calls per sync (bench_kt.py); kt-kernel 0.7.2 took 8 ms per call either way.
  for dt in int4 int8 bf16; do
    LD_LIBRARY_PATH=/tmp/deps/kt/kt_kernel.libs:${LD_LIBRARY_PATH:-} \
    python3 tests/bench/bench_kt.py "$(ls /tmp/deps/kt/kt_kernel/*kt_kernel_ext*.so | head -1)" --threads "$threads" \
      --dtypes $dt --layers 1 --m 1,16,128,512,2048 --batch "${KT_BATCH:-1}" >> "$out/kt_35b.jsonl" 2>> /tmp/kt.log \
      || { echo "kt-kernel $dt failed:"; tail -3 /tmp/kt.log; }
  done
fi
exit $failed
