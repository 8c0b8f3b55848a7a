# SPDX-License-Identifier: Apache-2.0
"""Router lookahead (Note [Router lookahead] in core/model/model.cpp): predicting each MoE layer's
experts one layer early, counted per layer and reported by rt.stats(), on tidal-mini (trained: its
routing is not random, so the prediction has something to find)."""

import numpy as np
import pytest
import tidal
from conftest import MINI

K, E, LAYERS = 4, 48, 8  # tidal-mini: top-4 of 48 experts, 8 MoE layers


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(MINI, progress=False)


@pytest.fixture(scope="module")
def ids():
    return np.load(MINI / "routing_trace.npz")["token_ids"][:96].tolist()


def test_off_by_default_and_reported_as_missing(rt, ids):
    rt.reset_stats()
    rt.logits(ids)
    st = rt.stats()
    assert st.prediction_precision is None and st.prediction_recall is None
    assert st.prediction_per_layer == {}
    assert not any("lookahead" in n for n in st.notes)  # no note for a feature that is off
    rt.set_router_lookahead(True)
    try:
        rt.reset_stats()
        assert any("router lookahead is on" in n for n in rt.stats().notes)
    finally:
        rt.set_router_lookahead(False)


def test_counts_per_layer_and_beats_chance(rt, ids):
    base = rt.logits(ids)
    rt.set_router_lookahead(True)
    try:
        rt.reset_stats()
        got = rt.logits(ids)
        st = rt.stats()
    finally:
        rt.set_router_lookahead(False)
    # Measuring changes nothing in the forward pass.
    np.testing.assert_array_equal(got, base)
    # Layer 0 has no earlier layer to predict it; every other MoE layer is predicted for every token.
    assert sorted(st.prediction_per_layer) == list(range(1, LAYERS))
    counts = rt._engine.stats()
    assert counts["lookahead_predicted"] == [0] + [len(ids) * K] * (LAYERS - 1)
    assert counts["lookahead_routed"] == counts["lookahead_predicted"]
    # Predicting top_k against top_k: precision and recall are the same number.
    assert st.prediction_precision == pytest.approx(st.prediction_recall)
    # Chance is K / E = 8%. The residual stream of a trained model changes slowly, so the next
    # layer's router mostly agrees on it: tidal-mini measured 0.746 on these 96 tokens (per layer
    # 0.64-0.83) and on all 8192 of its trace. The bound is far above chance and well below that.
    assert st.prediction_precision > 0.5, st.prediction_per_layer
    assert all(0.0 <= v["precision"] <= 1.0 for v in st.prediction_per_layer.values())
    assert "recall" in str(st)


def test_predicting_every_expert_finds_every_routed_one(rt, ids):
    rt.set_router_lookahead(True, predict_k=E)
    try:
        rt.reset_stats()
        rt.logits(ids[:10])
        st = rt.stats()
    finally:
        rt.set_router_lookahead(False)
    assert st.prediction_recall == 1.0
    assert st.prediction_precision == pytest.approx(K / E)


def test_more_predictions_raise_recall(rt, ids):
    recall = []
    for kp in (K, 2 * K):
        rt.set_router_lookahead(True, predict_k=kp)
        rt.reset_stats()
        rt.logits(ids)
        recall.append(rt.stats().prediction_recall)
    rt.set_router_lookahead(False)
    assert recall[1] > recall[0]


def test_replayed_routing_is_not_counted(rt, ids):
    from tidal import routing

    trace = routing.synthetic_trace(len(ids), LAYERS, E, K, skew=1.0, reuse=0.5, seed=3)
    rt.set_router_lookahead(True)
    try:
        rt.reset_stats()
        with rt.replay_routing(trace):
            rt.logits(ids)
        assert rt.stats().prediction_precision is None
    finally:
        rt.set_router_lookahead(False)


def test_bad_predict_k(rt):
    with pytest.raises(ValueError, match="predict_k"):
        rt.set_router_lookahead(True, predict_k=E + 1)
    with pytest.raises(ValueError, match="predict_k"):
        rt.set_router_lookahead(True, predict_k=-1)


def test_batched_rows_are_counted_per_sequence_row(rt):
    """forward_batch: one decode row per sequence, every row predicted and checked."""
    seqs = [rt.new_sequence() for _ in range(3)]
    for i, s in enumerate(seqs):
        s.forward([10 + i, 20 + i, 30 + i], all_logits=False)
    rt.set_router_lookahead(True)
    try:
        rt.reset_stats()
        rt.forward_batch(seqs, [5, 6, 7])
        counts = rt._engine.stats()
    finally:
        rt.set_router_lookahead(False)
    assert counts["lookahead_predicted"] == [0] + [3 * K] * (LAYERS - 1)
