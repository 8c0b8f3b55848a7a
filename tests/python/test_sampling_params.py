# SPDX-License-Identifier: Apache-2.0
"""Each sampling parameter of the C++ Sampler against a small numpy reference, defaults from
generation_config.json, seeded reproducibility through the text API, and argument checks."""

import numpy as np
import pytest
import tidal
from conftest import GOLDEN, MINI

V = 97  # odd vocabulary


def ref_penalize(logits, prompt, output, rep=1.0, presence=0.0, frequency=0.0):
    """vLLM / OpenAI semantics, written independently of the C++ code."""
    x = logits.astype(np.float64).copy()
    seen = set(prompt) | set(output)
    for t in seen:
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(x)) if output else np.zeros(len(x))
    x -= frequency * counts + presence * (counts > 0)
    return x


def ref_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """temperature -> top-k -> top-p -> min-p, renormalised (transformers' warper order)."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep = len(p) if top_k <= 0 else min(top_k, len(p))
    if top_p < 1.0:
        mass = p[order[:keep]].sum()
        cum, n = 0.0, 0
        while n < keep:
            cum += p[order[n]] / mass
            n += 1
            if cum >= top_p:
                break
        keep = max(1, n)
    if min_p > 0:
        n = 0
        while n < keep and p[order[n]] >= min_p * p[order[0]]:
            n += 1
        keep = max(1, n)
    out = np.zeros_like(p)
    idx = order[:keep]
    out[idx] = p[idx] / p[idx].sum()
    return out


@pytest.fixture
def logits():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2.0, V).astype(np.float32)
    x[3] = -x[3] if x[3] > 0 else x[3]  # make sure both signs are penalised
    x[5] = abs(x[5]) + 0.5
    return x


@pytest.mark.parametrize("rep", [1.0, 1.3, 0.8])
@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (0.7, 0.0), (0.0, 0.4), (-0.5, 1.1)])
def test_penalties_match_reference(logits, rep, presence, frequency):
    prompt = [3, 5, 11, 96]
    output = [5, 5, 7, 0, 5, 3]
    s = tidal.Sampler(repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency,
                      prompt_ids=prompt)
    for t in output:
        s.accept(t)
    want = ref_penalize(logits, prompt, output, rep, presence, frequency)
    np.testing.assert_allclose(s.penalized(logits), want, rtol=1e-6, atol=1e-6)
    if (rep, presence, frequency) != (1.0, 0.0, 0.0):
        assert not np.allclose(want, logits)  # the case is not trivial


def test_presence_and_frequency_ignore_the_prompt(logits):
    s = tidal.Sampler(presence_penalty=1.0, frequency_penalty=1.0, prompt_ids=[1, 2, 3])
    np.testing.assert_array_equal(s.penalized(logits), logits)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.5, top_k=5),
                                dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.1),
                                dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
                                dict(temperature=1.0, top_k=V + 10)])
def test_filters_match_reference(logits, kw):
    got = tidal.Sampler(**kw).probabilities(logits)
    want = ref_probs(logits.astype(np.float64), **kw)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(got.sum() - 1) < 1e-5


def test_penalties_then_filters(logits):
    s = tidal.Sampler(temperature=0.8, top_k=10, repetition_penalty=1.5, frequency_penalty=0.3, prompt_ids=[5])
    for t in (7, 7):
        s.accept(t)
    want = ref_probs(ref_penalize(logits, [5], [7, 7], 1.5, 0.0, 0.3), 0.8, top_k=10)
    np.testing.assert_allclose(s.probabilities(logits), want, atol=1e-6)


def test_greedy_applies_penalties(logits):
    top = int(np.argmax(logits))
    s = tidal.Sampler(temperature=0, presence_penalty=2.0)
    s.accept(top)
    assert s.sample(logits) == int(np.argmax(ref_penalize(logits, [], [top], presence=2.0)))
    assert tidal.Sampler(temperature=0).sample(logits) == top


def test_sample_frequencies_follow_distribution(logits):
    """20k draws: empirical frequencies within 4 sigma of the filtered distribution."""
    kw = dict(temperature=1.2, top_k=8)
    p = ref_probs(logits.astype(np.float64), **kw)
    s = tidal.Sampler(**kw, seed=3)
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=V)
    sigma = np.sqrt(n * p * (1 - p)) + 1e-9
    assert np.all(np.abs(counts - n * p) <= 4 * sigma + 1)
    assert np.count_nonzero(counts) == 8


def test_sampler_seeded_streams():
    x = np.linspace(-1, 1, V).astype(np.float32)
    a = [tidal.Sampler(temperature=1.0, seed=11).sample(x) for _ in range(1)]
    s1, s2, s3 = (tidal.Sampler(temperature=1.0, seed=k) for k in (11, 11, 12))
    r1 = [s1.sample(x) for _ in range(50)]
    assert r1 == [s2.sample(x) for _ in range(50)] and r1[0] == a[0]
    assert r1 != [s3.sample(x) for _ in range(50)]


@pytest.mark.parametrize("kw,match", [(dict(repetition_penalty=0.0), "repetition_penalty"),
                                      (dict(repetition_penalty=float("nan")), "repetition_penalty"),
                                      (dict(presence_penalty=2.5), "presence_penalty"),
                                      (dict(frequency_penalty=-3.0), "frequency_penalty"),
                                      (dict(top_p=0.0), "top_p"), (dict(min_p=2.0), "min_p"),
                                      (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k")])
def test_bad_parameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        tidal.Sampler(**kw)
    rt = _mini()
    with pytest.raises(ValueError, match=match):
        rt.generate("x", **kw)


_RT = {}


def _mini():
    if "rt" not in _RT:
        _RT["rt"] = tidal.Runtime.load(MINI, progress=False)
    return _RT["rt"]


def test_defaults_come_from_generation_config():
    rt = _mini()
    gc = rt.generation_config
    assert gc["do_sample"] and gc["temperature"] == 0.7
    # Default = the checkpoint's sampling: same seed, same tokens as passing its values explicitly.
    a = rt.generate("def f(x):\n", max_new_tokens=24, seed=5)
    b = rt.generate("def f(x):\n", max_new_tokens=24, seed=5, temperature=gc["temperature"], top_k=gc["top_k"],
                    top_p=gc["top_p"])
    greedy = rt.generate("def f(x):\n", max_new_tokens=24, temperature=0)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids
    # A checkpoint without generation_config.json is greedy by default (transformers semantics).
    g = tidal.Runtime.load(GOLDEN / "qwen3_moe", progress=False)
    ids = [5, 9, 2, 77]
    out = g.generate(ids, max_new_tokens=8).token_ids
    assert out[0] == int(np.argmax(g.logits(ids)[-1]))
    assert out == list(g._engine.generate(ids, max_new_tokens=8, temperature=0.0).token_ids)


def test_seeded_text_generation_reproducible():
    rt = _mini()
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=1234)
    a, b = rt.generate("import os\n", **kw), rt.generate("import os\n", **kw)
    c = rt.generate("import os\n", **{**kw, "seed": 1235})
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_repetition_penalty_changes_greedy_text():
    """The trained model loops under plain greedy decoding; the penalty must change the tokens and lower
    the repeated-token count."""
    rt = _mini()
    plain = rt.generate("def read_lines(path):\n", max_new_tokens=48, temperature=0)
    pen = rt.generate("def read_lines(path):\n", max_new_tokens=48, temperature=0, repetition_penalty=1.3)
    assert plain.token_ids != pen.token_ids
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))
