# SPDX-License-Identifier: Apache-2.0
"""Runtime.load(max_context=...): the plan sizes the KV cache for it, a prompt or forward call that
would pass it is a ValueError before any work (the sequence keeps its tokens), generation stops at
it, and bad values are named. CPU always; CUDA where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest

import tidal
from conftest import MINI

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not tidal.cuda_devices(),
                                                                   reason="needs a CUDA GPU (runs on the GPU machine)"))]
LIMIT = 48


@pytest.fixture(scope="module", params=DEVICES)
def rt(request):
    return tidal.Runtime.load(MINI, device=request.param, progress=False, max_context=LIMIT)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(v) for v in np.random.default_rng(seed).integers(5, 8000, n)]


def test_limit_and_plan(rt):
    assert rt.context_limit == LIMIT and rt.plan.context_tokens == LIMIT
    assert f"{LIMIT} tok" in str(rt.plan)


def test_prompt_past_the_limit_is_a_value_error(rt):
    with pytest.raises(ValueError, match=r"53 tokens but the context is 48 \(max_context given to Runtime.load\)"):
        rt.generate(_ids(LIMIT + 5), max_new_tokens=2, temperature=0)


def test_generation_stops_at_the_limit(rt):
    r = rt.generate(_ids(40, 1), max_new_tokens=100, temperature=0, ignore_eos=True)
    assert r.finish_reason == "length"
    assert 0 < len(r.token_ids) and 40 + len(r.token_ids) <= LIMIT


def test_forward_past_the_limit_runs_nothing(rt):
    seq = rt.new_sequence()
    seq.prefill(_ids(40, 2))
    with pytest.raises(ValueError, match=r"context full: the sequence holds 40 tokens and 9 more would pass "
                                         r"max_context = 48"):
        seq.forward(_ids(9, 3), all_logits=False)
    assert seq.num_tokens == 40  # nothing ran
    want = rt.new_sequence()
    want.prefill(_ids(40, 2))
    got = seq.forward(_ids(8, 4), all_logits=False)  # exactly to the limit
    np.testing.assert_array_equal(got, want.forward(_ids(8, 4), all_logits=False))
    assert seq.num_tokens == LIMIT
    with pytest.raises(ValueError, match="context full"):
        seq.forward([7], all_logits=False)
    with pytest.raises(ValueError, match="context full"):
        rt.forward_batch([seq, rt.new_sequence()], [7, 8])
    assert seq.num_tokens == LIMIT
    with pytest.raises(ValueError, match="context full: the sequence holds 0 tokens and 49 more"):
        rt.logits(_ids(LIMIT + 1, 6))
    assert rt.logits(_ids(LIMIT, 6)).shape == (LIMIT, rt.config.vocab_size)


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "64"])
def test_bad_max_context(bad):
    with pytest.raises(ValueError, match="max_context must be a positive number of tokens"):
        tidal.Runtime.load(MINI, progress=False, max_context=bad)


def test_max_context_longer_than_the_model():
    with pytest.raises(ValueError, match=r"max_context=5000 is longer than the model's context "
                                         r"\(max_position_embeddings = 4096\)"):
        tidal.Runtime.load(MINI, progress=False, max_context=5000)


def test_no_limit_by_default():
    rt = tidal.Runtime.load(MINI, progress=False)
    assert rt.context_limit == rt.config.max_position_embeddings
    seq = rt.new_sequence()
    seq.prefill(_ids(LIMIT + 10, 5))  # past what the limited runtime takes
    assert seq.num_tokens == LIMIT + 10


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8"])
def test_bad_gpu_expert_slots(bad):
    """Checked before anything loads, whatever the device (the cache exists only on device="cuda")."""
    with pytest.raises(ValueError, match="gpu_expert_slots must be an int >= 0"):
        tidal.Runtime.load(MINI, progress=False, gpu_expert_slots=bad)
