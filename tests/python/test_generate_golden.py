# SPDX-License-Identifier: Apache-2.0
"""Golden tests: tidal's CPU engine against Hugging Face transformers references (tests/fixtures).

Cases: the four tiny random-weight architecture fixtures and the shipped trained model tidal-mini."""

import json

import numpy as np
import pytest
import tidal
from conftest import GOLDEN_CASES
from tolerances import CHUNKED_PREFILL_ATOL, GOLDEN_LOGITS_ATOL


@pytest.fixture(scope="module", params=sorted(GOLDEN_CASES))
def case(request):
    ckpt, ref_dir = GOLDEN_CASES[request.param]
    ref = np.load(ref_dir / "reference.npz")
    return request.param, tidal.Runtime.load(ckpt), ref


def test_fixture_is_nontrivial(case):
    name, rt, ref = case
    meta = json.loads((GOLDEN_CASES[name][1] / "meta.json").read_text())
    assert len(ref["prompt_ids"]) >= 100, "prompt must span several DeltaNet chunks"
    assert np.abs(ref["logits"]).max() > 1.0
    assert meta["min_greedy_margin"] > 1e-3, "greedy reference too close to a tie to compare tokens"


def test_prefill_logits_match_transformers(case):
    name, rt, ref = case
    got = rt.logits(ref["prompt_ids"])
    assert got.dtype == np.float32 and got.shape == ref["logits"].shape
    err = np.abs(got - ref["logits"]).max()
    assert err <= GOLDEN_LOGITS_ATOL, f"{name}: max |logits - transformers| = {err}"


def test_greedy_tokens_match_transformers(case):
    name, rt, ref = case
    # Greedy and no EOS stop, as the reference (tidal-mini's generation_config samples by default).
    out = rt.generate(ref["prompt_ids"], max_new_tokens=len(ref["greedy_ids"]), temperature=0, ignore_eos=True)
    assert list(out.token_ids) == ref["greedy_ids"].tolist(), name
    assert out.finish_reason == "length"


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(case, chunk):
    name, rt, ref = case
    ids = ref["prompt_ids"]
    one_shot = rt.logits(ids)
    seq = rt.new_sequence()
    parts = [seq.forward(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    chunked = np.concatenate(parts)
    assert seq.num_tokens == len(ids)
    err = np.abs(chunked - one_shot).max()
    assert err <= CHUNKED_PREFILL_ATOL, f"{name}: chunk={chunk}: max diff {err}"


def test_decode_after_chunked_prefill_matches_greedy(case):
    name, rt, ref = case
    seq = rt.new_sequence()
    ids = ref["prompt_ids"]
    for i in range(0, len(ids), 7):
        last = seq.forward(ids[i:i + 7], all_logits=False)
    tokens = []
    for _ in range(len(ref["greedy_ids"])):
        tok = int(np.argmax(last[0]))
        tokens.append(tok)
        last = seq.forward([tok], all_logits=False)
    assert tokens == ref["greedy_ids"].tolist()


def test_threads_do_not_change_results(case):
    name, _, ref = case
    ckpt = GOLDEN_CASES[name][0]
    one = tidal.Runtime.load(ckpt, num_threads=1).logits(ref["prompt_ids"][:20])
    two = tidal.Runtime.load(ckpt, num_threads=2).logits(ref["prompt_ids"][:20])
    np.testing.assert_array_equal(one, two)
