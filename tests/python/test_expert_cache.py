# SPDX-License-Identifier: Apache-2.0
"""The VRAM expert cache's C++ slot bookkeeping (tidal._tidal.ExpertSlotCache, offload/expert_cache.h)
against tidal.cache_sim's Python model of the same policies, on synthetic routing traces
(deterministic, no GPU)."""

import numpy as np
import pytest

from tidal._tidal import ExpertSlotCache
from tidal.cache_sim import simulate, simulate_native
from tidal.routing import synthetic_trace


@pytest.mark.parametrize("skew,reuse", [(0.0, 0.0), (1.0, 0.5), (1.2, 0.0)])
@pytest.mark.parametrize("slots", [0, 7, 60, 200])
def test_lru_and_static_count_what_the_model_counts(skew, reuse, slots):
    trace = synthetic_trace(300, 6, 32, 4, skew=skew, reuse=reuse)
    for policy in ("lru", "static"):
        ref = simulate(trace, 32, slots, policy, warmup=75)
        got = simulate_native(trace, 32, slots, policy, warmup=75)
        assert (got.hits, got.misses, got.evictions) == (ref.hits, ref.misses, ref.evictions), policy
        assert got.layer_hits == ref.layer_hits, policy
        assert got.layer_accesses == ref.layer_accesses


@pytest.mark.parametrize("skew,reuse", [(0.0, 0.0), (1.0, 0.5)])
def test_lfu_matches_the_model_up_to_ties(skew, reuse):
    trace = synthetic_trace(400, 6, 32, 4, skew=skew, reuse=reuse)
    for decay in (0.9, 0.98):
        ref = simulate(trace, 32, 60, "lfu", warmup=100, decay=decay)
        got = simulate_native(trace, 32, 60, "lfu", warmup=100, decay=decay)
        assert got.hits + got.misses == ref.hits + ref.misses
        # Exact ties of decayed counts are broken differently (lower key vs member order).
        assert abs(got.hit_rate - ref.hit_rate) < 0.02, (decay, got.hit_rate, ref.hit_rate)


def test_lfu_without_ties_is_exact():
    # One layer, one expert per token, decay 0.9: decayed counts are sums of distinct powers of 0.9,
    # so no two tie and both implementations must evict the same expert every time.
    rng = np.random.default_rng(3)
    ids = rng.choice(12, size=500, p=np.arange(1, 13) / 78.0)
    trace = ids.reshape(-1, 1, 1).astype(np.int32)
    ref = simulate(trace, 12, 4, "lfu", decay=0.9)
    got = simulate_native(trace, 12, 4, "lfu", decay=0.9)
    assert (got.hits, got.misses, got.evictions) == (ref.hits, ref.misses, ref.evictions)
    assert ref.evictions > 50  # the policy was exercised


def test_counters_pins_and_errors():
    c = ExpertSlotCache(2, 8, 2, "lru", 0.98, 1000)
    assert c.lookup(0, [3, 5]) == [-1, -1]
    assert c.admit(0, 3) == (0, -1, -1)
    assert c.admit(0, 5) == (1, -1, -1)
    assert c.admit(1, 7)[0] == -1  # both slots pinned by this step
    c.release_pins()
    assert c.admit(1, 7) == (0, 0, 3)
    assert c.expert_in(0) == (1, 7)
    s = c.stats()
    assert s[0]["bytes_in"] == 2000 and s[1]["not_admitted"] == 1 and s[0]["evictions"] == 1
    assert (c.slots, c.resident, c.policy) == (2, 2, "lru")
    with pytest.raises(ValueError, match="unknown expert cache policy 'fifo'"):
        ExpertSlotCache(1, 4, 2, "fifo")
    with pytest.raises(ValueError, match="decay"):
        ExpertSlotCache(1, 4, 2, "lfu", 0.0)
    with pytest.raises(ValueError, match="outside"):
        c.lookup(2, [0])
    with pytest.raises(ValueError, match="already in slot"):
        c.admit(1, 7)


@pytest.mark.parametrize("policy", ["lru", "lfu", "static"])
def test_runtime_rules_on_traces(policy):
    """tidal.cache_sim.simulate_runtime replays the runtime's own step rules (ExpertCacheSchedule):
    every routed pair counted once, copies within the limit, deterministic, and with room for every
    expert the GPU computes nearly all of them once the copies have landed."""
    from tidal.cache_sim import simulate_runtime

    layers, experts, k, tokens = 6, 32, 4, 300
    trace = synthetic_trace(tokens, layers, experts, k, skew=1.0, reuse=0.5)
    small = simulate_runtime(trace, experts, 20, policy, max_fills=4, warmup=100, static_steps=80)
    assert small.gpu_pairs + small.host_pairs == (tokens - 100) * layers * k
    assert small.fills_per_token <= 4
    assert simulate_runtime(trace, experts, 20, policy, max_fills=4, warmup=100, static_steps=80) == small
    if policy == "static":  # profiled for 80 tokens, then frozen: no copies after the warm-up
        assert small.fills == 0
    else:
        assert small.fills > 0
    everything = simulate_runtime(trace, experts, layers * experts, policy, max_fills=64, warmup=100)
    assert everything.gpu_share > 0.95
    assert 0 < small.gpu_share < everything.gpu_share
    # The limit binds: one copy at a time lands fewer experts than 64.
    slow = simulate_runtime(trace, experts, layers * experts, policy, max_fills=1, warmup=100)
    assert slow.gpu_share < everything.gpu_share
    # A dense layer's rows (-1) are no routed pairs; no slots: everything on the host; bad ids.
    dense = trace.copy()
    dense[:, 2, :] = -1
    r = simulate_runtime(dense, experts, 20, policy, max_fills=4, warmup=100, static_steps=80)
    assert r.gpu_pairs + r.host_pairs == (tokens - 100) * (layers - 1) * k
    none = simulate_runtime(trace, experts, 0, policy, warmup=100)
    assert none.gpu_pairs == 0 and none.host_pairs == (tokens - 100) * layers * k
    with pytest.raises(ValueError, match="not below num_experts"):
        simulate_runtime(trace, experts - 1, 20, policy)
