# SPDX-License-Identifier: Apache-2.0
"""The `tidal` command line.

    tidal run MODEL -p "Write is_prime(n)."      one reply, streamed (chat template when the model has one)
    tidal chat MODEL                             interactive chat: /reset, /think on|off, /stats, /exit
    tidal info MODEL --gpu-memory 12G            config, sizes and the placement plan, without loading
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main"]

DIM, RESET = "\033[2m", "\033[0m"


def _add_generation_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("generation (defaults: the checkpoint's generation_config.json)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per physical core, one fewer with a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--gpu-memory", default=None, help="VRAM budget with --device cuda (e.g. 11G; default: all free)")
    ap.add_argument("--gpu-weights", default="bf16", choices=["bf16", "int8"],
                    help="format of the GPU-resident weights with --device cuda")
    ap.add_argument("--max-context", type=int, default=None,
                    help="tokens a conversation may hold (default: the model's context)")
    ap.add_argument("--no-think", action="store_true", help="enable_thinking=False in the chat template")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, plan or statistics")


def _generation_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "stop")
    return {k: getattr(a, k) for k in keys if getattr(a, k) is not None}


def _load(a: argparse.Namespace) -> Any:
    import tidal

    return tidal.Runtime.load(a.model, device=a.device, num_threads=a.threads, progress=not a.quiet,
                              gpu_memory=a.gpu_memory, gpu_weights=a.gpu_weights, max_context=a.max_context)


class _Printer:
    """Streams chunks to stdout; reasoning dimmed on a terminal, marked otherwise."""

    def __init__(self, show_reasoning: bool = True):
        self.tty = sys.stdout.isatty()
        self.channel = None
        self.show_reasoning = show_reasoning

    def __call__(self, chunk: Any) -> None:
        if chunk.channel == "end":
            if self.channel == "reasoning" and self.tty:
                sys.stdout.write(RESET)
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.channel = None
            return
        if chunk.channel == "reasoning" and not self.show_reasoning:
            return
        if chunk.channel != self.channel:
            if self.channel == "reasoning":
                sys.stdout.write(RESET + "\n" if self.tty else "\n[/think]\n")
            if chunk.channel == "reasoning":
                sys.stdout.write(DIM if self.tty else "[think]\n")
            self.channel = chunk.channel
        if chunk.channel == "tool_call":
            fn = chunk.tool_call["function"]
            sys.stdout.write(f"[tool call] {fn['name']}({fn['arguments']})\n")
        else:
            sys.stdout.write(chunk.text)
        sys.stdout.flush()


def _summary(r: Any) -> str:
    return (f"[{r.prompt_tokens} prompt tokens ({r.cached_tokens} reused), {r.completion_tokens} generated, "
            f"prefill {r.prefill_tokens_per_second:.0f} tok/s, decode {r.decode_tokens_per_second:.1f} tok/s, "
            f"finish: {r.finish_reason}]")


def cmd_run(a: argparse.Namespace) -> int:
    rt = _load(a)
    kw = _generation_kwargs(a)
    if a.raw or rt.chat_template is None:
        stream = rt.generate(a.prompt, stream=True, **kw)
    else:
        stream = rt.chat([{"role": "user", "content": a.prompt}], stream=True,
                         enable_thinking=False if a.no_think else None, **kw)
    show = _Printer()
    for chunk in stream:
        show(chunk)
    if not a.quiet:
        print(_summary(stream.result), file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    rt = _load(a)
    if rt.chat_template is None:
        print(f"tidal chat: {a.model} has no chat template; use `tidal run --raw`", file=sys.stderr)
        return 2
    think = not a.no_think
    messages = [{"role": "system", "content": a.system}] if a.system else None
    session = rt.session(messages=messages, preserve_thinking=a.preserve_thinking or None, **_generation_kwargs(a))
    print("tidal chat: /reset, /think on|off, /stats, /exit (Ctrl-D)", file=sys.stderr)
    show = _Printer()
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.reset(messages)
            print("[conversation reset]")
            continue
        if cmd.startswith("/think"):
            arg = cmd.split()[1:] or ["on" if not think else "off"]
            if arg[0] not in ("on", "off"):
                print("usage: /think on|off")
                continue
            think = arg[0] == "on"
            print(f"[thinking {'on' if think else 'off'}]")
            continue
        if cmd == "/stats":
            print(rt.stats())
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd.split()[0]}: /reset, /think on|off, /stats, /exit")
            continue
        stream = session.chat(line, stream=True, enable_thinking=None if think else False)
        try:
            for chunk in stream:
                show(chunk)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, keeps the session
            stream.close()
            print("\n[interrupted]")
            continue
        if not a.quiet:
            print(_summary(stream.result), file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .plan import format_bytes, inspect, plan

    s = inspect(a.model)
    c = s.config
    n_attn = sum(t == "full_attention" for t in c.layer_types)
    print(f"model        {a.model}")
    print(f"model_type   {c.model_type} (family {c.family})")
    print(f"layers       {c.num_hidden_layers} ({c.num_hidden_layers - n_attn} Gated DeltaNet, {n_attn} full attention), "
          f"hidden {c.hidden_size}, vocab {c.vocab_size}")
    print(f"attention    {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, head_dim {c.head_dim}, "
          f"rotary {c.rotary_dim}, max positions {c.max_position_embeddings}")
    print(f"experts      {c.num_experts} routed ({c.num_experts_per_tok} active, width {c.moe_intermediate_size}), "
          f"shared width {c.shared_expert_intermediate_size}")
    print(f"checkpoint   {s.num_tensors} tensors, {format_bytes(s.total_bytes)} ("
          + ", ".join(f"{k} {format_bytes(v)}" for k, v in s.dtypes.items()) + ")")
    for k, v in s.part_bytes.items():
        if v:
            print(f"  {k:<16} {format_bytes(v):>12}")
    print(f"KV cache     {format_bytes(s.kv_bytes_per_token())} per token (BF16); DeltaNet state "
          f"{format_bytes(s.deltanet_state_bytes())} per sequence")
    p = plan(s, device="cuda" if a.gpu_memory else "cpu", gpu_memory=a.gpu_memory, context_tokens=a.context)
    print(p)
    return 0 if p.fits else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tidal", description="Run sparse MoE language models (Qwen3-Next, "
                                 "Qwen3.5/3.6-MoE, Qwen3-MoE) on a desktop.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate one reply")
    r.add_argument("model", help="checkpoint directory")
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    _add_generation_args(r)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("chat", help="interactive chat in the terminal")
    c.add_argument("model", help="checkpoint directory")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--preserve-thinking", action="store_true", help="keep earlier turns' reasoning in the prompt")
    _add_generation_args(c)
    c.set_defaults(fn=cmd_chat)
    i = sub.add_parser("info", help="config, sizes and placement plan (reads headers only)")
    i.add_argument("model", help="checkpoint directory")
    i.add_argument("--gpu-memory", default=None, help="GPU budget, e.g. 12G (omit for the CPU plan)")
    i.add_argument("--context", type=int, default=None,
                   help="context length the plan reserves KV cache for (default: min(32768, the model's))")
    i.set_defaults(fn=cmd_info)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (see: tidal serve --help)", add_help=False)
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:  # its own parser (tidal.serve), so `tidal serve --help` shows its options
        from .serve import main as serve_main

        return serve_main(args[1:])
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (FileNotFoundError, ValueError, NotImplementedError, MemoryError, TypeError) as exc:
        print(f"tidal {a.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
