# SPDX-License-Identifier: Apache-2.0
"""The `tidal` command line (run, chat, info), load progress, the placement plan and rt.stats()."""

import os
import shutil
import subprocess
import sys

import pytest
import tidal
from conftest import GOLDEN, MINI


def tidal_cli(*args, stdin=None):
    """`python -m tidal ...` with the same interpreter and environment as the tests."""
    return subprocess.run([sys.executable, "-m", "tidal", *args], input=stdin, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def test_cli_run_streams_a_chat_reply():
    p = tidal_cli("run", str(MINI), "-p", "Write is_prime(n).", "--seed", "0", "-n", "60", "--temperature", "0",
                  "--repetition-penalty", "1.3")
    assert p.returncode == 0, p.stderr
    rt = tidal.Runtime.load(MINI, progress=False)
    want = rt.chat([{"role": "user", "content": "Write is_prime(n)."}], max_new_tokens=60, temperature=0,
                   repetition_penalty=1.3)
    assert want.reasoning in p.stdout and "[think]" in p.stdout
    assert "loading weights" in p.stderr and "placement (device=cpu)" in p.stderr and "decode" in p.stderr


def test_cli_run_raw_and_quiet():
    p = tidal_cli("run", str(MINI), "--raw", "-p", "import os\n", "-n", "12", "--temperature", "0", "--quiet")
    assert p.returncode == 0 and p.stderr == ""
    rt = tidal.Runtime.load(MINI, progress=False)
    assert p.stdout == rt.generate("import os\n", max_new_tokens=12, temperature=0).text + "\n"


def test_cli_chat_commands():
    script = "Write is_even(n).\n/think off\nNow is_odd(n).\n/stats\n/reset\n/think maybe\n/nope\n/exit\n"
    p = tidal_cli("chat", str(MINI), "-n", "30", "--seed", "1", "--quiet", stdin=script)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("[think]") == 1  # only the first turn thinks
    assert "[thinking off]" in out and "[conversation reset]" in out and "usage: /think on|off" in out
    assert "unknown command /nope" in out and "prefill" in out and "decode" in out


@pytest.mark.skipif(shutil.which("tidal") is None, reason="the `tidal` console script is installed by pip install .")
def test_console_script():
    p = subprocess.run(["tidal", "info", str(MINI)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "qwen3_5_moe_text" in p.stdout


def test_cli_info_and_errors(tmp_path):
    p = tidal_cli("info", str(MINI), "--gpu-memory", "2G")
    assert p.returncode == 0, p.stderr
    assert "context 4096 tokens" in p.stdout  # the model's max_position_embeddings, below 32768
    assert "qwen3_5_moe_text" in p.stdout and "routed_experts" in p.stdout and "expert cache: 384 of 384" in p.stdout
    p = tidal_cli("info", str(GOLDEN / "qwen3_next"), "--gpu-memory", "100M")
    assert p.returncode == 1 and "does not fit" in p.stdout
    p = tidal_cli("info", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = tidal_cli("info", str(MINI), "--gpu-memory", "twelve")
    assert p.returncode == 2 and "memory size" in p.stderr
    p = tidal_cli("run", str(MINI), "-p", "x", "--temperature", "-1", "--quiet")
    assert p.returncode == 2 and "temperature" in p.stderr


def test_plan_numbers():
    s = tidal.inspect(MINI)
    c = s.config
    assert s.part_bytes["routed_experts"] == 2 * 3 * 48 * 32 * 256 * c.num_hidden_layers  # BF16 gate+up+down
    assert s.expert_bytes == 3 * 32 * 256 * 2
    assert s.part_bytes["unused"] > 0  # the MTP head is not run
    assert s.kv_bytes_per_token() == 2 * 2 * 2 * 64 * 2  # 2 attention layers, K+V, 2 heads, dim 64, BF16
    p = tidal.plan(s, device="cuda", gpu_memory="1G", context_tokens=1024)
    free = (1 << 30) - (s.pinned_bytes + s.kv_bytes_per_token() * 1024 + s.deltanet_state_bytes() + (768 << 20))
    assert p.fits and p.expert_cache_slots == min(384, free // s.expert_bytes)
    # Prefill expert streaming takes the longest chunk's buffers that fit 3/4 of what the cache would
    # get (tidal-mini at 1 GiB with an 8192-token context: 8192-token chunks need 256 MiB of the
    # ~204 MiB left, 4096 need 141 MiB), no longer than the context needs.
    from tidal.plan import STREAM_CHUNKS, stream_vram_bytes
    assert [stream_vram_bytes(s, t) < stream_vram_bytes(s, 2 * t) for t in STREAM_CHUNKS[1:]] == [True] * 3
    assert p.stream_chunk == 1024  # a 1024-token context
    p8 = tidal.plan(s, device="cuda", gpu_memory="1G", context_tokens=8192)
    free8 = (1 << 30) - (s.pinned_bytes + s.kv_bytes_per_token() * 8192 + s.deltanet_state_bytes() + (768 << 20))
    assert p8.stream_chunk == 4096 and stream_vram_bytes(s, 8192) > 0.75 * free8 >= stream_vram_bytes(s, 4096)
    assert p8.vram["prefill streaming (4096 tok)"] == stream_vram_bytes(s, 4096)
    assert any("prefill streaming (4096 tok)" in line for line in p8.lines())
    assert tidal.plan(s, device="cuda", gpu_memory="12G", context_tokens=4096).stream_chunk == 4096
    assert tidal.plan(s, device="cuda", gpu_memory="12G", context_tokens=3000).stream_chunk == 4096
    assert tidal.plan(s, device="cuda", gpu_memory="12G", context_tokens=5000).stream_chunk == 4096  # its 4096 positions
    off = tidal.plan(s, device="cuda", gpu_memory="1G", context_tokens=8192, prefill_stream=False)
    assert off.stream_chunk == 0 and not any("prefill" in k for k in off.vram)
    assert off.vram_used == p8.vram_used - stream_vram_bytes(s, 4096)  # the same cache: every expert fits
    tight = tidal.plan(s, device="cuda", gpu_memory=800 << 20, context_tokens=1024)
    assert tight.fits and 0 < tight.expert_cache_slots < 384 and tight.stream_chunk == 0
    assert not tidal.plan(s, device="cuda", gpu_memory="700M").fits
    with pytest.raises(ValueError, match="gpu_memory"):
        tidal.plan(s, device="cuda")


def test_load_progress_reports_bytes(capsys):
    calls = []
    eng = tidal._tidal.Runtime.load(MINI, progress=lambda d, t: calls.append((d, t)))
    total = eng.stats()["weight_bytes"]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert eng.stats()["weights_populated"]
    lazy = tidal._tidal.Runtime.load(MINI, populate=False)
    assert not lazy.stats()["weights_populated"]
    tidal.Runtime.load(MINI)
    err = capsys.readouterr().err
    assert "loading weights" in err and "placement (device=cpu)" in err


def test_stats_account_for_generation():
    rt = tidal.Runtime.load(MINI, progress=False)
    r = rt.generate("def f(x):\n", max_new_tokens=20, temperature=0, ignore_eos=True)
    st = rt.stats()
    assert st.prefill_tokens == r.prompt_tokens and st.decode_tokens == 19
    assert st.prefill_seconds > 0 and st.decode_seconds > 0 and st.decode_tokens_per_second > 0
    assert st.time["cpu_experts"] > 0 and st.time["cpu_dense"] > 0 and st.time["gpu"] == 0
    assert abs(sum(st.time.values()) - (st.prefill_seconds + st.decode_seconds)) < 1e-6
    assert st.expert_cache_hit_rate is None and st.prediction_precision is None and st.notes
    assert st.expert_cache_layers == {}
    raw = rt._engine.stats()
    assert st.memory["weights_ram"] + st.memory["experts_ram"] == raw["weight_bytes"]
    assert st.memory["experts_ram"] == raw["expert_bytes"] > 0 and st.memory["weights_ram"] > 0
    assert st.memory["kv_and_state"] == 0 and st.live_sequences == 0
    assert st.last["completion_tokens"] == 20
    d = st.to_dict()
    assert d["decode_tokens_per_second"] == st.decode_tokens_per_second and "decode" in str(st)
    seq = rt.new_sequence()
    seq.forward(rt.encode("hello world"))
    assert rt.stats().live_sequences == 1 and rt.stats().memory["kv_and_state"] > 0
    rt.reset_stats()
    assert rt.stats().decode_tokens == 0 and rt.stats().live_sequences == 1


def test_plan_that_does_not_fit_says_what_would():
    from tidal.plan import GPU_RESERVE_BYTES, plan

    s = tidal.inspect(MINI)
    rest = s.deltanet_state_bytes() + GPU_RESERVE_BYTES
    need = s.pinned_bytes + s.kv_bytes_per_token() * 4096 + rest
    # 2 MiB short: a shorter context fits (exactly this many tokens), and int8 weights fit the full one.
    budget = need - (2 << 20)
    p = plan(s, device="cuda", gpu_memory=budget, context_tokens=4096)
    assert not p.fits
    ctx = (budget - s.pinned_bytes - rest) // s.kv_bytes_per_token()
    assert 0 < ctx < 4096
    assert "2.00 MiB missing" in p.problem
    assert f"a context of at most {ctx} tokens" in p.problem
    assert 'gpu_weights="int8" (pinned weights about half) with the 4096-token context' in p.problem
    # Below what even int8 weights and one token need: only a larger budget helps.
    p = plan(s, device="cuda", gpu_memory=s.pinned_bytes // 2 + rest - 1, context_tokens=4096)
    assert not p.fits and "raise gpu_memory" in p.problem and "would fit" not in p.problem
    # Exactly what it needs: it fits, and says nothing.
    p = plan(s, device="cuda", gpu_memory=need, context_tokens=4096)
    assert p.fits and p.problem == ""
    # int8 GPU weights count about half the pinned bytes: the budget 2 MiB short now fits.
    p = plan(s, device="cuda", gpu_memory=budget, context_tokens=4096, gpu_weights="int8")
    assert p.fits and p.vram["pinned weights (int8)"] == s.pinned_bytes // 2
    with pytest.raises(ValueError, match="gpu_weights"):
        plan(s, device="cuda", gpu_memory=budget, gpu_weights="fp8")


def test_load_refuses_a_budget_the_plan_cannot_hold():
    """Runtime.load(device="cuda", gpu_memory=..., max_context=...) checks the plan before it reads
    or allocates anything: the error says how much is missing and what would fit (so it is the
    same on a machine without a GPU, where CI runs it)."""
    from tidal.plan import GPU_RESERVE_BYTES

    s = tidal.inspect(MINI)
    need = s.pinned_bytes + s.kv_bytes_per_token() * 4096 + s.deltanet_state_bytes() + GPU_RESERVE_BYTES
    with pytest.raises(MemoryError, match=r"Runtime.load: the GPU part needs .* missing; would fit: .*max_context"):
        tidal.Runtime.load(MINI, device="cuda", gpu_memory=need - (2 << 20), max_context=4096, progress=False)
