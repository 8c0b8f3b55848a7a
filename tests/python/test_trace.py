# SPDX-License-Identifier: Apache-2.0
"""rt.trace(): Chrome trace JSON of forward calls (Note [Step trace]) on tidal-mini, device="cpu":
per layer spans nested in their forward call, every layer present, the file valid, nothing
recorded outside the block, and results unchanged."""

import json

import numpy as np
import pytest
import tidal
from conftest import MINI

LAYERS = 8
ATTENTION = {3, 7}  # full_attention_interval 4


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(MINI, progress=False)


def test_trace_of_a_generation(rt, tmp_path):
    path = tmp_path / "step.json"
    with rt.trace(path) as tr:
        rt.generate("def read_lines(path):", max_new_tokens=3)
    doc = json.loads(path.read_text())
    assert doc["traceEvents"] == tr.events
    forwards = tr.spans("step", "forward")
    assert len(forwards) >= 2  # the prompt, then decode steps
    for f in forwards:
        t0, t1 = f["ts"], f["ts"] + f["dur"]
        inside = [e for e in tr.spans() if e is not f and t0 <= e["ts"] and e["ts"] + e["dur"] <= t1 + 1e-3]
        by = {}
        for e in inside:
            by.setdefault(e["name"], []).append(e.get("args", {}).get("layer"))
        assert sorted(by["deltanet"]) == [i for i in range(LAYERS) if i not in ATTENTION]
        assert sorted(by["attention"]) == sorted(ATTENTION)
        for name in ("router", "routed_experts", "shared_expert"):
            assert sorted(by[name]) == list(range(LAYERS)), name
        assert by["lm_head"] == [None]
        # The layer spans do not overlap on the host thread, so they fit in their forward call.
        assert sum(e["dur"] for e in inside) <= f["dur"] * 1.001 + 1.0
        assert all(e["dur"] >= 0 and e["tid"] >= 3 for e in inside)  # host tracks; 1 GPU, 2 copies
    assert tr.total_us("cpu_experts") > 0
    cats = {e["cat"] for e in tr.spans()}
    assert cats == {"step", "cpu_dense", "cpu_experts"}  # no GPU on device="cpu"


def test_nothing_recorded_outside_and_results_unchanged(rt):
    ids = list(range(1, 40))
    base = rt.logits(ids)
    with rt.trace() as tr:
        traced = rt.logits(ids)
    np.testing.assert_array_equal(traced, base)
    assert tr.path is None and len(tr.spans("step")) == 1
    rt.logits(ids[:5])  # after the block: not recorded
    rt._engine.start_trace()
    events = json.loads(rt._engine.stop_trace())["traceEvents"]
    assert [e["ph"] for e in events] == ["M"]  # only the GPU track's name


def test_trace_with_lookahead_and_batch(rt):
    rt.set_router_lookahead(True)
    try:
        with rt.trace() as tr:
            rt.logits([5, 6, 7])
    finally:
        rt.set_router_lookahead(False)
    # Layers 1..7 are predicted one layer early.
    assert sorted(e["args"]["layer"] for e in tr.spans(name="router_lookahead")) == list(range(1, LAYERS))
    # A batched decode step: one forward_batch span holding every layer's spans once.
    seqs = [rt.new_sequence() for _ in range(2)]
    for s in seqs:
        s.forward([1, 2, 3], all_logits=False)
    with rt.trace() as tr:
        rt.forward_batch(seqs, [4, 5])
    (f,) = tr.spans("step", "forward_batch")
    experts = [e for e in tr.spans("cpu_experts") if f["ts"] <= e["ts"] <= f["ts"] + f["dur"]]
    assert sorted(e["args"]["layer"] for e in experts) == list(range(LAYERS))
