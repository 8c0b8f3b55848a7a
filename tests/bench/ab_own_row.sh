#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A/B of Note [One token reads its own row] (kernels/cpu/moe_experts.cpp) on the GPU test machine's
# CPU: the M = 1 decode op, 35B shape, 16 threads, with and without (TIDAL_EXPERT_OWN_ROW=0) the
# in-place token row, interleaved four times in one call. Needs .devcarry (make_devcarry.sh).
# JSON lines in $OUT/ab.jsonl, one summary line per run on stdout.
set -e
mkdir -p /tmp/deps && tar -xJf .devcarry/deps.tar.xz -C /tmp/deps
export LD_LIBRARY_PATH=/tmp/deps/lib
cmake -S . -B build/bench -G Ninja -DTIDAL_CUDA=OFF -DTIDAL_BUILD_TESTS=ON -DTIDAL_BUILD_BENCHMARKS=ON -DTIDAL_BUILD_PYTHON=OFF -DCMAKE_PREFIX_PATH=/tmp/deps > /tmp/b.log 2>&1
ninja -C build/bench tidal_bench_experts >> /tmp/b.log 2>&1
echo built $SECONDS
b=./build/bench/tests/bench/tidal_bench_experts
for rep in 1 2 3 4; do for o in 1 0; do
  TIDAL_EXPERT_OWN_ROW=$o $b --shape 35b --m 1 --threads 16 --dtypes int4,int8 --executors spin --dataflow 0,1 --seconds 1 | grep moe_experts | sed "s/^{/{\"own_row\":$o,/"
done; done > $OUT/ab.jsonl
python3 - $OUT/ab.jsonl <<'P'
import json,sys
for l in open(sys.argv[1]):
    d=json.loads(l); print(d["own_row"], d["dtype"], "flow", d["dataflow"], d["median_us"], d["bw_fraction"], round(d["read_bw_gbps"]), d["phase_us"]["prepare_x"])
P
