# SPDX-License-Identifier: Apache-2.0
"""tidal.cache_sim: expert-cache policies on hand-made and synthetic routing traces
(deterministic, no GPU)."""

import numpy as np
import pytest

from tidal.cache_sim import POLICIES, simulate, main
from tidal.routing import synthetic_trace


def _one_layer(ids):
    return np.asarray(ids, np.int32).reshape(-1, 1, 1)


def test_lru_and_lfu_differ_as_they_should():
    # Slots 2: expert 0 is used three times, then 1 and 2 arrive, then 0 again.
    trace = _one_layer([0, 0, 0, 1, 2, 0])
    lru = simulate(trace, 4, 2, "lru")
    # LRU: after 0,1 the least recent is 0, so 2 evicts it and the last 0 misses.
    assert (lru.hits, lru.misses, lru.evictions) == (2, 4, 2)
    lfu = simulate(trace, 4, 2, "lfu", decay=1.0)
    # LFU: 0 has count 3, so 2 evicts 1 and the last 0 hits.
    assert (lfu.hits, lfu.misses, lfu.evictions) == (3, 3, 1)


def test_lfu_decay_forgets_old_popularity():
    # 0 is hot early, then 1 and 2 alternate for a long time: with strong decay 0's old count fades
    # and the cache keeps 1 and 2 (a miss of 2 after 1 evicts 0, not 1).
    trace = _one_layer([0] * 5 + [1, 2] * 20)
    slow = simulate(trace, 3, 2, "lfu", decay=1.0)
    fast = simulate(trace, 3, 2, "lfu", decay=0.5)
    assert fast.hit_rate > slow.hit_rate
    assert fast.misses == 3  # 0, 1, 2 once each


def test_static_set_comes_from_the_warmup_and_never_changes():
    # Two layers; the warm-up uses (layer 0, expert 3) and (layer 1, expert 1) most.
    warm = [[3, 1], [3, 1], [2, 0]]
    rest = [[3, 1], [2, 0], [3, 0]]
    trace = np.asarray(warm + rest, np.int32).reshape(6, 2, 1)
    r = simulate(trace, 4, 2, "static", warmup=3)
    assert r.evictions == 0
    assert r.layer_accesses == [3, 3] and r.layer_hits == [2, 1]
    assert (r.hits, r.misses) == (3, 3)


def test_warmup_is_not_counted_and_dense_layers_are_skipped():
    trace = np.asarray([[[0], [-1]], [[0], [-1]], [[1], [-1]]], np.int32)
    r = simulate(trace, 2, 1, "lru", warmup=1)
    assert r.layer_accesses == [2, 0]
    assert (r.hits, r.misses, r.evictions) == (1, 1, 1)


@pytest.mark.parametrize("policy", POLICIES)
def test_random_routing_hits_about_the_cached_share(policy):
    # Uniform, uncorrelated routing: any policy hits about slots / experts of the time.
    trace = synthetic_trace(1500, 4, 64, 4, skew=0.0, reuse=0.0, seed=3)
    r = simulate(trace, 64, 64, policy, warmup=300)  # 64 of 256 (layer, expert) keys: 25%
    assert abs(r.hit_rate - 0.25) < 0.03, r.hit_rate
    assert r.hits + r.misses == 1200 * 4 * 4


@pytest.mark.parametrize("policy", POLICIES)
def test_skewed_correlated_routing_hits_more(policy):
    random = synthetic_trace(1500, 4, 64, 4, skew=0.0, reuse=0.0, seed=5)
    skewed = synthetic_trace(1500, 4, 64, 4, skew=1.0, reuse=0.5, seed=5)
    r0 = simulate(random, 64, 64, policy, warmup=300)
    r1 = simulate(skewed, 64, 64, policy, warmup=300)
    assert r1.hit_rate > r0.hit_rate + 0.15, (r0.hit_rate, r1.hit_rate)


def test_results_are_deterministic():
    trace = synthetic_trace(400, 3, 32, 4, skew=0.8, reuse=0.3, seed=9)
    for policy in POLICIES:
        a = simulate(trace, 32, 20, policy, warmup=100)
        b = simulate(trace, 32, 20, policy, warmup=100)
        assert (a.hits, a.misses, a.evictions, a.layer_hits) == (b.hits, b.misses, b.evictions, b.layer_hits)


def test_bad_arguments():
    trace = _one_layer([0, 1])
    with pytest.raises(ValueError, match="policy"):
        simulate(trace, 2, 1, "fifo")
    with pytest.raises(ValueError, match="slots"):
        simulate(trace, 2, -1)
    with pytest.raises(ValueError, match="warmup"):
        simulate(trace, 2, 1, warmup=2)
    with pytest.raises(ValueError, match="decay"):
        simulate(trace, 2, 1, "lfu", decay=0.0)
    with pytest.raises(ValueError, match="expert ids"):
        simulate(trace, 1, 1)
    with pytest.raises(ValueError, match="tokens, layers, top_k"):
        simulate(np.zeros((2, 2), np.int32), 2, 1)


def test_cli_prints_a_table(capsys):
    assert main(["--slots", "16", "--tokens", "200", "--layers", "2", "--experts", "32", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "| random (skew 0, reuse 0) | lru |" in out and "| skewed (skew 1.0, reuse 0.5) | static |" in out


def test_history_predictors_on_hand_made_traces():
    from tidal.cache_sim import predict

    # 1 layer, top-2 of 6. A constant trace is predicted exactly from the previous token.
    const = np.tile(np.array([[[1, 4]]]), (10, 1, 1))
    r = predict(const, 6, "previous")
    assert (r.predicted, r.routed, r.hits) == (18, 18, 18) and r.precision == r.recall == 1.0
    # Alternating disjoint sets: the previous token never helps; the popular fill finds the other.
    alt = np.array([[[0, 1]], [[2, 3]]] * 5)
    assert predict(alt, 6, "previous").hits == 0
    r = predict(alt, 6, "previous+popular", predict_k=4, warmup=2)
    assert r.recall == 1.0 and r.precision == 0.5
    # Predicting every expert finds every routed one; precision is top_k / E.
    r = predict(alt, 6, "previous+popular", predict_k=6)
    assert r.recall == 1.0 and r.precision == pytest.approx(2 / 6)
    # Dense layers (-1) are neither predicted nor counted.
    mixed = np.concatenate([const, np.full((10, 1, 2), -1)], axis=1)
    assert predict(mixed, 6, "previous").routed == 18


def test_history_predictor_arguments():
    from tidal.cache_sim import predict

    t = np.zeros((4, 1, 2), int)
    t[:, 0, 1] = 1
    with pytest.raises(ValueError, match="unknown predictor"):
        predict(t, 6, "oracle")
    with pytest.raises(ValueError, match="previous\\+popular"):
        predict(t, 6, "previous", predict_k=3)
    with pytest.raises(ValueError, match="predict_k"):
        predict(t, 6, "previous+popular", predict_k=7)
    with pytest.raises(ValueError, match="warmup"):
        predict(t, 6, "previous", warmup=4)


def test_history_predictor_on_synthetic_traces():
    """Random routing is unpredictable from history (chance: k / E); the skewed trace's reuse makes
    the previous token a predictor of about its reuse probability."""
    from tidal.cache_sim import predict
    from tidal.routing import synthetic_trace

    rnd = synthetic_trace(400, 2, 64, 4, skew=0.0, reuse=0.0, seed=1)
    assert predict(rnd, 64, "previous", warmup=50).precision < 0.15  # chance 4/64 = 6%
    skew = synthetic_trace(400, 2, 64, 4, skew=1.0, reuse=0.5, seed=1)
    p = predict(skew, 64, "previous", warmup=50)
    assert 0.5 <= p.precision <= 0.85
    assert predict(skew, 64, "previous+popular", predict_k=8, warmup=50).recall > p.recall
