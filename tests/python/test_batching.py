# SPDX-License-Identifier: Apache-2.0
"""Batched decoding (Runtime.forward_batch) and the batching scheduler (Runtime.enable_batching) on
tidal-mini: a batch of sequences gives each the logits it gets alone, concurrent generations equal
sequential ones and really run as batches, prompts prefill in chunks, cancellation and deadlines hit
only their own sequence, admission answers Busy. CPU always; CUDA where a GPU exists."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import tidal
from conftest import MINI

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not tidal.cuda_devices(),
                                                                   reason="needs a CUDA GPU (runs on the GPU machine)"))]
PROMPTS = ["def fib(n):", "import os\n", "class Stack:", "# sort a list\n", "for i in range(", "print(",
           "x = [1, 2,", "while True:"]


def _load(device: str) -> tidal.Runtime:
    kw = {"device": device, "progress": False}
    if device == "cuda":
        kw["gpu_precision"] = "fp32"  # the mode that matches the CPU engine closely
    return tidal.Runtime.load(MINI, **kw)


@pytest.fixture(scope="module", params=DEVICES)
def pair(request):
    """(reference runtime without batching, runtime with the scheduler on)."""
    ref = _load(request.param)
    rt = _load(request.param)
    rt.enable_batching(max_batch=8, max_requests=4, prefill_chunk=16, batch_wait=0.05)
    return ref, rt


def _tol(rt) -> float:
    return 0.0 if rt.device == "cpu" else 2e-3


def test_forward_batch_equals_one_sequence_at_a_time(pair):
    ref, _ = pair
    ids = [ref.encode(p) for p in PROMPTS[:5]]
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) > 1  # different positions in one batch
    alone = [ref.new_sequence() for _ in ids]
    batch = [ref.new_sequence() for _ in ids]
    for a, b, i in zip(alone, batch, ids):
        a.prefill(i)
        b.prefill(i)
    for step in range(3):  # several steps: the KV caches and DeltaNet states advance per sequence
        toks = [(97 * k + 13 * step) % 8000 + 5 for k in range(len(ids))]
        got = ref.forward_batch(batch, toks)
        assert got.shape == (len(ids), ref.config.vocab_size)
        for k, (a, t) in enumerate(zip(alone, toks)):
            want = a.forward([t], all_logits=False)[0]
            err = float(np.abs(got[k] - want).max())
            assert err <= _tol(ref) * float(np.abs(want).max()), (step, k, err)
    assert [s.num_tokens for s in batch] == [n + 3 for n in lengths]


def test_forward_batch_bad_input(pair):
    ref, _ = pair
    a, b = ref.new_sequence(), ref.new_sequence()
    with pytest.raises(ValueError, match="2 sequences but 1 token ids"):
        ref.forward_batch([a, b], [1])
    with pytest.raises(ValueError, match="the same sequence twice"):
        ref.forward_batch([a, a], [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        ref.forward_batch([a, b], [1, 10**9])
    with pytest.raises(ValueError, match="at least one"):
        ref.forward_batch([], [])
    assert a.num_tokens == 0 and b.num_tokens == 0  # nothing ran


def test_concurrent_generations_equal_sequential_and_batch(pair):
    ref, rt = pair
    want = {p: ref.generate(p, max_new_tokens=20, temperature=0, ignore_eos=True).token_ids for p in PROMPTS}
    before = rt.scheduler_stats()
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def one(p):
        barrier.wait()
        got[p] = rt.generate(p, max_new_tokens=20, temperature=0, ignore_eos=True).token_ids

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    st = rt.scheduler_stats()
    steps = st["decode_steps"] - before["decode_steps"]
    rows = st["decode_rows"] - before["decode_rows"]
    assert rows == len(PROMPTS) * 19  # every token after the first comes from a decode step
    assert st["max_rows"] >= 4 and rows / steps >= 2.0, (rows, steps)  # really batched
    assert st["prefill_chunks"] > before["prefill_chunks"]


def test_long_prompt_prefills_in_chunks_between_decode_steps(pair):
    ref, rt = pair
    prompt = [(31 * i) % 8000 + 3 for i in range(100)]  # 7 chunks of 16
    want = ref.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    before = rt.scheduler_stats()["prefill_chunks"]
    assert rt.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids == want
    assert rt.scheduler_stats()["prefill_chunks"] - before == 7


def test_cancel_one_stream_leaves_the_others(pair):
    ref, rt = pair
    want = {p: ref.generate(p, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids for p in PROMPTS[:3]}
    got = {}
    victim = rt.generate("x = 1\n", stream=True, max_new_tokens=3000, ignore_eos=True, temperature=0)
    started = threading.Event()

    def drain_victim():
        for i, _ in enumerate(victim):
            if i == 2:
                started.set()

    def one(p):
        got[p] = rt.generate(p, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids

    tv = threading.Thread(target=drain_victim)
    tv.start()
    assert started.wait(60)
    others = [threading.Thread(target=one, args=(p,)) for p in PROMPTS[:3]]
    for t in others:
        t.start()
    victim.cancel()  # from this thread, while another one is inside the victim's steps
    tv.join(60)
    assert not tv.is_alive()
    for t in others:
        t.join()
    assert got == want
    assert victim.result.finish_reason == "cancelled" and len(victim.result.token_ids) < 3000


def test_cancel_stops_a_prefill_at_a_chunk_boundary(pair):
    _, rt = pair
    seq = rt.new_sequence()
    prompt = [(7 * i) % 8000 + 3 for i in range(4000)]  # 250 chunks of 16
    err: list[BaseException] = []

    def run():
        try:
            seq.prefill(prompt)
        except BaseException as e:  # noqa: BLE001 - asserted below
            err.append(e)

    before = rt.scheduler_stats()
    t = threading.Thread(target=run)
    t.start()
    for _ in range(2000):
        if rt.scheduler_stats()["prefill_chunks"] - before["prefill_chunks"] >= 2:
            break
        time.sleep(0.001)
    seq.cancel()
    t.join(60)
    assert len(err) == 1 and isinstance(err[0], tidal.Cancelled), err
    assert 0 < seq.num_tokens < len(prompt) and seq.num_tokens % 16 == 0
    assert rt.scheduler_stats()["cancelled"] > before["cancelled"]
    # The flag was used up: the sequence goes on.
    assert seq.forward([5], all_logits=False).shape == (1, rt.config.vocab_size)


def test_cancel_before_a_call_and_deadlines(pair):
    ref, rt = pair
    for r in (ref, rt):  # with and without the scheduler
        seq = r.new_sequence()
        seq.cancel()
        with pytest.raises(tidal.Cancelled, match="cancelled"):
            seq.prefill([1, 2, 3])
        seq.prefill([1, 2, 3])  # the cancel was for one call
        seq.set_deadline(1e-6)
        time.sleep(0.01)
        with pytest.raises(TimeoutError, match="deadline"):
            seq.forward([4], all_logits=False)
        seq.set_deadline(0)
        assert seq.forward([4], all_logits=False).shape == (1, r.config.vocab_size)
        with pytest.raises(ValueError, match="deadline"):
            seq.set_deadline(-1)
    assert rt.scheduler_stats()["deadline_exceeded"] >= 1


def test_admission_is_bounded(pair):
    _, rt = pair
    busy_before = rt.scheduler_stats()["rejected"]
    tickets = [rt.try_admit() for _ in range(4)]
    with pytest.raises(tidal.Busy, match="max_requests=4"):
        rt.try_admit()
    tickets[0].release()
    tickets[0].release()  # idempotent
    tickets.append(rt.try_admit())
    st = rt.scheduler_stats()
    assert st["active_requests"] == 4 and st["rejected"] == busy_before + 1
    for t in tickets:
        t.release()
    assert rt.scheduler_stats()["active_requests"] == 0


def test_scheduler_options_are_checked(pair):
    ref, rt = pair
    with pytest.raises(ValueError, match="already enabled"):
        rt.enable_batching()
    fresh = _load("cpu")
    with pytest.raises(ValueError, match="batching is off"):
        fresh.try_admit()
    assert fresh.scheduler_stats() == {} and not fresh.batching
    for bad in ({"max_batch": 0}, {"max_requests": 0}, {"prefill_chunk": 0}, {"batch_wait": -1.0},
                {"batch_wait": float("nan")}):
        with pytest.raises(ValueError):
            fresh.enable_batching(**bad)
    assert not fresh.batching


@pytest.mark.skipif(not tidal.cuda_devices(), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_cuda_batches_over_eight_rows_match_single_rows_at_default_precision():
    """More rows than one GEMV takes: the batch still decodes with the one-row numerics (bf16x2)."""
    rt = tidal.Runtime.load(MINI, device="cuda", progress=False)
    n = 12
    alone = [rt.new_sequence() for _ in range(n)]
    batch = [rt.new_sequence() for _ in range(n)]
    for k, (a, b) in enumerate(zip(alone, batch)):
        ids = [(11 * k + j) % 8000 + 5 for j in range(3 + k)]
        a.prefill(ids)
        b.prefill(ids)
    toks = [(29 * k) % 8000 + 7 for k in range(n)]
    got = rt.forward_batch(batch, toks)
    for k, (a, t) in enumerate(zip(alone, toks)):
        want = a.forward([t], all_logits=False)[0]
        assert float(np.abs(got[k] - want).max()) <= 1e-4 * float(np.abs(want).max()), k


def test_stream_controls_do_not_leak_into_the_next_turn(pair):
    _, rt = pair
    s = rt.session()
    st = s.generate("def f(x):", stream=True, max_new_tokens=4, temperature=0)
    st.set_deadline(30)
    list(st)
    st.cancel()  # after the end: no effect on the session's next turn
    r = s.generate("def g(y):", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 4
