# SPDX-License-Identifier: Apache-2.0
"""`tidal.Runtime`: a loaded model with text in, text out.

Wraps the native engine (`_tidal.Runtime`: checkpoint checks, forward passes, sampling, all in C++)
with the checkpoint's tokenizer, chat template and generation defaults, streaming, chat parsing,
sessions and statistics.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

import numpy as np

from . import _tidal
from .chat_template import ChatTemplate
from .generation import ChatResult, GenerationResult, SamplingOptions, Stream, StreamChunk, run
from .plan import Plan, format_bytes, inspect, parse_bytes, plan
from .stats import Stats
from .text import prompt_opens_reasoning
from .tokenizer import Tokenizer, read_generation_config

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Runtime"]

Prompt = Union[str, Sequence[int], np.ndarray]


def _default_gpu_expert_slots() -> int | None:
    """Runtime.load's default gpu_expert_slots: None (the VRAM expert cache sized automatically), or
    TIDAL_GPU_EXPERT_SLOTS ("auto" for None, or a count; "0" turns the cache off) read when tidal is
    imported, so that a whole script or test suite can run with another default."""
    v = os.environ.get("TIDAL_GPU_EXPERT_SLOTS", "").strip()
    if not v or v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"TIDAL_GPU_EXPERT_SLOTS must be 'auto' or an int >= 0, got {v!r}")
    return n


_GPU_EXPERT_SLOTS = _default_gpu_expert_slots()


def _progress_bar(enabled: bool):
    """A tqdm byte counter for loading (None when disabled or tqdm is missing)."""
    if not enabled:
        return None, None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bare install of the module must still load
        return None, None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights",
                       leave=True, file=sys.stderr)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


class Runtime:
    """A loaded model. Create with `Runtime.load(path)`.

    Attributes
    ----------
    config : ModelConfig
        The resolved model configuration.
    tokenizer : Tokenizer | None
        From tokenizer.json (None when the checkpoint has none: token ids only).
    chat_template : ChatTemplate | None
    generation_config : dict
        generation_config.json: default sampling parameters and EOS ids.
    plan : Plan
        Where each part of the model lives.
    """

    def __init__(self, engine: Any, path: pathlib.Path, plan_: Plan, tokenizer: str | os.PathLike | None = None):
        self._engine = engine
        self.path = path
        self.plan = plan_
        tok_dir = None if tokenizer is None else pathlib.Path(os.fspath(tokenizer))
        if tok_dir is not None and tok_dir.is_file():
            tok_dir = tok_dir.parent
        if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer={os.fspath(tokenizer)!r}: no tokenizer.json there")
        self.generation_config: dict[str, Any] = {}
        self.tokenizer: Tokenizer | None = None
        self.chat_template: ChatTemplate | None = None
        if path.suffix == ".gguf" and path.is_file():
            # Note [GGUF models]: tokenizer, EOS and chat template come from the file's metadata.
            from .gguf import read as read_gguf

            md = read_gguf(path).metadata
            if tok_dir is None and md.get("tokenizer.ggml.model", "none") != "none":
                self.tokenizer = Tokenizer.from_gguf(md, source=str(path))
            tpl = md.get("tokenizer.chat_template")
            if isinstance(tpl, str):
                self.chat_template = ChatTemplate(tpl)
            if self.tokenizer is not None and self.tokenizer.eos_token_ids:
                self.generation_config = {"eos_token_id": list(self.tokenizer.eos_token_ids)}
            from .gguf import SAMPLING_KEYS

            sampling = {name: md[key] for name, key in SAMPLING_KEYS.items() if isinstance(md.get(key), (int, float))}
            if sampling:  # the file's recommended sampling (general.sampling.*)
                self.generation_config.update(do_sample=True, **sampling)
        else:
            self.generation_config = read_generation_config(path)
            if tok_dir is None and (path / "tokenizer.json").is_file():
                self.tokenizer = Tokenizer.from_checkpoint(path)
            try:
                self.chat_template = ChatTemplate.from_checkpoint(path)
            except (FileNotFoundError, ValueError):
                self.chat_template = None
        if tok_dir is not None:  # the user's tokenizer wins (and its template, where the model has none)
            self.tokenizer = Tokenizer.from_checkpoint(tok_dir)
            self.generation_config = {**self.generation_config, **read_generation_config(tok_dir)}
            if self.chat_template is None:
                try:
                    self.chat_template = ChatTemplate.from_checkpoint(tok_dir)
                except (FileNotFoundError, ValueError):
                    pass
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        else:
            self.eos_token_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else []
        self._last: GenerationResult | None = None
        self._cached_prompt_tokens = 0
        self._prompt_tokens = 0

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu", cpu_threads: int = 0, progress: bool = True,
             populate: bool = True, expert_dtype: str = "auto", expert_group_size: int = 0,
             cpu_isa: str = "auto", expert_cache: str | os.PathLike = "auto",
             num_threads: int | None = None, gpu_memory: str | int | None = None, gpu_weights: str = "bf16",
             gpu_precision: str = "bf16x2", cuda_graphs: bool = True,
             kv_cache_dtype: str = "bf16", tokenizer: str | os.PathLike | None = None,
             max_context: int | None = None, gpu_expert_slots: int | None = _GPU_EXPERT_SLOTS,
             gpu_expert_policy: str = "lfu") -> "Runtime":
        """Load a Hugging Face checkpoint directory (config.json + safetensors, tokenizer files optional;
        BF16 or official FP8 weights) or a llama.cpp GGUF file (the first part of a split one).

        Every tensor is checked before compute; bad input raises FileNotFoundError, tidal.FormatError,
        NotImplementedError or ValueError naming the problem, MemoryError when the model cannot fit.
        `progress` shows a tqdm bar (bytes, ETA) while the dense weights are read into RAM and the routed
        experts are packed, then prints the placement plan to stderr. `populate=False` maps the dense
        weights lazily instead (pages are read on first use).

        Parameters
        ----------
        cpu_threads : int
            CPU worker threads (0: one per physical core; with device="cuda" one fewer, so that the
            thread driving the GPU keeps a core). `num_threads` is the same setting's old name.
        expert_dtype : {"auto", "bf16", "int8", "int4"}
            Format of the routed experts in RAM. "auto" keeps bf16 when it fits in the available memory,
            else the most precise quantised format that fits. INT8/INT4 are symmetric with one fp16 scale
            per `expert_group_size` (32, 64 or 128; 0 = 128 for int8, 64 for int4) input columns.
            GGUF experts: Q8_0 / Q4_0 become int8 / int4 with group 32 exactly; other ggml types (Q4_K,
            Q5_K, Q6_K, ...) are decoded and requantised to int8 group 32 (int4 when int8 does not fit).
            FP8 experts: int8 (then int4) at the default groups.
        cpu_isa : {"auto", "scalar", "avx2", "avx512", "amx"}
            Highest instruction set the CPU kernels use; "auto" takes the best this CPU has, capped by the
            TIDAL_CPU_ISA environment variable.
        expert_cache : "auto", "off" or a directory
            Where packed int8/int4 experts are kept so the next load maps them instead of quantising
            again. "auto": `<checkpoint>/.tidal-cache` (or `$XDG_CACHE_HOME/tidal`) for checkpoints
            with at least 1 GiB of BF16/F16/F32/FP8 experts (GGUF experts are repacked at every load: their
            INT8 repack is larger than the file). A changed checkpoint or format is detected and rebuilt.
        device : "cpu", "cuda" or "cuda:N"
            "cuda" keeps embeddings, attention and DeltaNet layers, routers, shared experts and lm_head in
            VRAM (routed experts stay in RAM on the CPU kernels).
        gpu_memory : "11G", bytes or None
            VRAM budget (None: what is free at load); MemoryError when the GPU part does not fit.
        gpu_weights : {"bf16", "int8"}
            Format of the GPU-resident matrices; "int8" (weight-only, per-row scale) halves them.
        gpu_precision : {"bf16x2", "bf16", "fp32"}
            Prefill matrix products (more than 8 tokens). "bf16x2": BF16 tensor cores with activations split
            into two BF16 terms (near-fp32 results at twice the BF16 cost); "bf16": one term, fastest,
            activations rounded to BF16; "fp32": fp32 GEMMs and an fp32 KV cache, the mode that reproduces
            the CPU engine. Decode projections always use fp32 activations; the KV cache is BF16 except in
            "fp32".
        cuda_graphs : bool
            Replay each decode step from CUDA graphs (off: launch kernels one by one).
        tokenizer : path or None
            A tokenizer.json (or the directory holding it, with its tokenizer_config.json and
            generation_config.json) to use instead of the model's own: for GGUF files whose tokenizer tidal
            cannot rebuild, or checkpoints without one.
        kv_cache_dtype : {"bf16", "fp32"}
            Element type of the GPU KV cache; "fp32" doubles its memory and removes the BF16 rounding of
            keys and values (gpu_precision="fp32" implies it).
        max_context : int or None
            Tokens one sequence may hold, prompt and generated (at most the model's
            max_position_embeddings). The placement plan sizes the KV cache for it; a prompt or a forward
            call that would pass it raises ValueError before any work, and generation stops there with
            finish_reason "length". None: the model's context, with the plan sized for
            min(32768, max_position_embeddings).
        gpu_expert_slots : int or None
            device="cuda": routed experts kept in a VRAM cache and computed on the GPU during decode
            (docs/architecture.md, "The VRAM expert cache"). None: as many as gpu_memory leaves after
            the weights, workspaces and a KV cache of max_context tokens, at most every routed expert
            (the default; measured at full depth: the 35B-A3B shape decodes 2.3x llama.cpp with it); 0:
            none, every routed expert on the CPU; a number: that many. The environment variable
            TIDAL_GPU_EXPERT_SLOTS ("auto" or a number, e.g. 0), read when tidal is imported, replaces
            the default.
        gpu_expert_policy : {"lfu", "lru", "static"}
            Which cached expert a missed one replaces: decayed use counts, least recently used, or none
            (placed as "lfu" over the first 256 decode steps, then frozen: no copies after that).
        """
        p = pathlib.Path(os.fspath(path))
        if tokenizer is not None:
            t = pathlib.Path(os.fspath(tokenizer))
            if not (t / "tokenizer.json" if t.is_dir() else t).is_file():
                raise FileNotFoundError(f"tokenizer={os.fspath(tokenizer)!r}: no tokenizer.json there")
        if num_threads is not None:
            cpu_threads = num_threads
        if gpu_expert_slots is not None and (isinstance(gpu_expert_slots, bool) or not isinstance(gpu_expert_slots, int)
                                             or gpu_expert_slots < 0):
            raise ValueError(f"gpu_expert_slots must be an int >= 0 (or None), got {gpu_expert_slots!r}")
        gpu_bytes = 0 if gpu_memory is None else parse_bytes(gpu_memory)
        if gpu_memory is not None and gpu_bytes == 0:
            raise ValueError("gpu_memory must be > 0 (or None for what is free)")
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                        or max_context < 1):
            raise ValueError(f"max_context must be a positive number of tokens (or None), got {max_context!r}")
        if device != "cpu" and gpu_memory is not None and max_context is not None and gpu_weights in ("bf16", "int8"):
            # The planner's check before anything is read or allocated (issue 7: an impossible
            # budget is a clear error saying what is missing and what would fit); a bad
            # gpu_weights is left to the engine's own error.
            pre = plan(inspect(p), device="cuda", gpu_memory=gpu_bytes, context_tokens=max_context,
                       gpu_weights=gpu_weights)
            if not pre.fits:
                raise MemoryError(f"Runtime.load: {pre.problem}")
        update, close = _progress_bar(progress)
        try:
            engine = _tidal.Runtime.load(p, device=device, num_threads=cpu_threads, populate=populate,
                                         expert_dtype=expert_dtype, expert_group_size=expert_group_size,
                                         cpu_isa=cpu_isa, expert_cache=os.fspath(expert_cache),
                                         progress=update, gpu_memory=gpu_bytes, gpu_weights=gpu_weights,
                                         gpu_precision=gpu_precision, cuda_graphs=bool(cuda_graphs),
                                         kv_cache_dtype=kv_cache_dtype, max_context=max_context or 0,
                                         gpu_expert_slots=-1 if gpu_expert_slots is None else gpu_expert_slots,
                                         gpu_expert_policy=gpu_expert_policy)
        finally:
            if close:
                close()
        summary = inspect(p)
        on_gpu = device != "cpu"
        stream_plan = dict(engine.describe()).get("prefill_stream", "off") if on_gpu else "off"
        rt = cls(engine, p, plan(summary, device="cuda" if on_gpu else "cpu",
                                 gpu_memory=engine.memory_report()["limit"] if on_gpu else None,
                                 context_tokens=max_context or min(32768, summary.config.max_position_embeddings),
                                 prefill_stream=not stream_plan.startswith("off")),
                 tokenizer=tokenizer)
        if progress:
            st = engine.stats()
            print(f"tidal: loaded {p.name} ({rt.config.model_type}, {format_bytes(st['weight_bytes'])}) in "
                  f"{st['load_seconds']:.2f}s, {engine.num_threads} threads", file=sys.stderr)
            print(rt.plan, file=sys.stderr)
            if on_gpu:  # what the load allocated and chose, beside the plan's estimate
                m = engine.memory_report()
                print(f"  loaded: VRAM weights {format_bytes(m['weights'])}, workspaces {format_bytes(m['workspaces'])}, "
                      f"expert cache {format_bytes(m['expert_cache'])} ({engine.stats()['gpu_expert_slots']} slots); "
                      f"prefill expert streaming {stream_plan}", file=sys.stderr)
        return rt

    # ---------------------------------------------------------------- engine passthrough
    @property
    def config(self) -> Any:
        return self._engine.config

    @property
    def num_threads(self) -> int:
        return self._engine.num_threads

    @property
    def context_limit(self) -> int:
        """Tokens one sequence may hold: `max_context` from load, else the model's
        max_position_embeddings."""
        return self._engine.max_context or self.config.max_position_embeddings

    def describe(self) -> dict[str, str]:
        """What runs: device, CPU and the ISA its kernels use, the routed experts' format
        (expert_dtype, expert_group_size, expert_layout) and the tile kernels of the last forward call."""
        return dict(self._engine.describe())

    @property
    def device(self) -> str:
        return self._engine.device

    def memory_report(self) -> dict[str, int]:
        """VRAM use in bytes on device="cuda": weights (and weights_bf16_equivalent, the same matrices at
        BF16), kv_cache, deltanet_state, workspaces, used, free, total and limit (the budget)."""
        return dict(self._engine.memory_report())

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 (len(token_ids), vocab_size): logits at every position of a fresh sequence."""
        return self._engine.logits(token_ids)

    def enable_batching(self, *, max_batch: int = 32, max_requests: int = 16, prefill_chunk: int = 512,
                        batch_wait: float = 0.003) -> None:
        """Run the forward calls of all sequences through the batching scheduler from now on: the
        one-token steps of sequences generating at the same time (from several threads) go through
        each MoE layer as one batch, so every routed expert is read once per step for all of them;
        prompts are prefilled in chunks of `prefill_chunk` tokens between decode steps. A step waits
        up to `batch_wait` seconds for the other sequences of the last batch. `try_admit()` then
        bounds the running requests at `max_requests` (`tidal serve` turns this on)."""
        self._engine.enable_batching(max_batch=max_batch, max_requests=max_requests, prefill_chunk=prefill_chunk,
                                     batch_wait=batch_wait)

    @property
    def batching(self) -> bool:
        """Whether enable_batching() was called."""
        return bool(self._engine.batching)

    def try_admit(self) -> Any:
        """With batching on: a slot for one more request (call .release() when it ends), or
        `tidal.Busy` when max_requests are running."""
        return self._engine.try_admit()

    def scheduler_stats(self) -> dict[str, int]:
        """Counters of the batching scheduler: decode_steps, decode_rows (their mean batch is
        rows / steps), max_rows, prefill_chunks, admitted, rejected, active_requests, cancelled,
        deadline_exceeded, failed, queued. Empty while batching is off."""
        return dict(self._engine.scheduler_stats())

    def forward_batch(self, sequences: Sequence[Any], token_ids: Sequence[int]) -> np.ndarray:
        """One decode step of several distinct sequences at once: token_ids[b] is appended to
        sequences[b]. Returns float32 logits (B, vocab_size). Every MoE layer runs the B rows as one
        batch (each routed expert read once for all of them); attention and DeltaNet layers run each
        sequence on its own state."""
        return self._engine.forward_batch(list(sequences), token_ids)

    def new_sequence(self) -> Any:
        """A fresh `Sequence` (explicit KV cache + DeltaNet state) for token-level control."""
        return self._engine.new_sequence()

    # ---------------------------------------------------------------- text
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: this checkpoint has no tokenizer.json, so text input is not possible; "
                             "pass token ids")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._need_tokenizer().decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _prompt_ids(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give some text or token ids")
            return self.encode(prompt), prompt
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be a str or a sequence of token ids, not bytes")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError("prompt must be a str or a 1-D sequence of integer token ids")
        return [int(i) for i in ids], None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                    enable_thinking: bool | None = None, preserve_thinking: bool | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text of a conversation, as transformers' apply_chat_template renders it. Options
        left at None are not passed, so the template's own defaults apply."""
        if self.chat_template is None:
            raise ValueError(f"{self.path}: no chat template (chat_template.jinja or tokenizer_config.json)")
        kw = dict(template_kwargs)
        if enable_thinking is not None:
            kw["enable_thinking"] = enable_thinking
        if preserve_thinking is not None:
            kw["preserve_thinking"] = preserve_thinking
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kw)

    # ---------------------------------------------------------------- generation
    def _options(self, kw: dict[str, Any]) -> SamplingOptions:
        return SamplingOptions.resolve(self.generation_config, self.eos_token_ids, **kw)

    def _start(self, prompt_ids: list[int], opts: SamplingOptions, result: GenerationResult, *, stream: bool,
               in_reasoning: bool, tools: Any = None, seq: Any = None, **hooks: Any) -> Any:
        if opts.stop and self.tokenizer is None:
            raise ValueError("stop strings need the checkpoint's tokenizer (tokenizer.json); use stop_token_ids")
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        # Checked again in C++; here too so that a stream fails when created, not at its first chunk.
        V = self.config.vocab_size
        for i, t in enumerate(prompt_ids):
            if not 0 <= t < V:
                raise ValueError(f"token_ids[{i}] = {t} is out of range [0, {V}) (vocab_size)")
        ctx = self.context_limit
        if len(prompt_ids) >= ctx:
            why = ("max_context given to Runtime.load" if self._engine.max_context
                   else "max_position_embeddings")
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context is {ctx} ({why}): "
                             "shorten it")
        seq = seq if seq is not None else self._engine.new_sequence()
        user_finish = hooks.pop("on_finish", None)

        def on_finish(r: GenerationResult) -> None:
            self._last = r
            self._prompt_tokens += r.prompt_tokens
            self._cached_prompt_tokens += r.cached_tokens
            if user_finish:
                user_finish(r)

        gen = run(seq, hooks.pop("feed", prompt_ids), prompt_ids, opts, result, tokenizer=self.tokenizer,
                  in_reasoning=in_reasoning, tools=tools, max_positions=self.context_limit,
                  on_finish=on_finish, **hooks)
        if stream:
            return Stream(gen, result, seq)
        for _ in gen:
            pass
        return result

    def generate(self, prompt: Prompt, *, stream: bool = False, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> Any:
        """Continue `prompt` (text or token ids).

        Sampling parameters left at None come from the checkpoint's generation_config.json (greedy
        when it does not set do_sample). Generation ends at an EOS id, one of `stop_token_ids`, one of
        the `stop` strings (excluded from the text, found even across token boundaries), after
        `max_new_tokens`, or when the context is full.

        Returns a `GenerationResult`, or with ``stream=True`` a `Stream` of `StreamChunk` text deltas
        (always whole UTF-8 characters; reasoning inside ``<think>`` told apart from content).
        """
        ids, text = self._prompt_ids(prompt)
        opts = self._options(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  min_p=min_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                  repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                  stop_token_ids=stop_token_ids, ignore_eos=ignore_eos))
        in_reasoning = False
        if self.tokenizer is not None:
            tail = text if text is not None else self.tokenizer.decode(ids[-64:], skip_special_tokens=False)
            in_reasoning = prompt_opens_reasoning(tail)
        return self._start(ids, opts, GenerationResult(), stream=stream, in_reasoning=in_reasoning)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             enable_thinking: bool | None = None, preserve_thinking: bool | None = None,
             tools: Sequence[Mapping[str, Any]] | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
             **generation: Any) -> Any:
        """Reply to a conversation (OpenAI-style messages). Stateless: for multi-turn reuse of the cache
        use `session()`.

        Returns a `ChatResult` (`reasoning`, `content`, `tool_calls`, and `message` to append to
        `messages`), or a `Stream` with ``stream=True``. enable_thinking / preserve_thinking / tools go
        to the chat template; other keyword arguments are those of `generate`.
        """
        prompt = self.render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                                  preserve_thinking=preserve_thinking, **dict(chat_template_kwargs or {}))
        ids = self.encode(prompt)
        opts = self._options(generation)
        return self._start(ids, opts, ChatResult(), stream=stream, in_reasoning=prompt_opens_reasoning(prompt),
                           tools=tools)

    def session(self, messages: Sequence[Mapping[str, Any]] | None = None, **defaults: Any) -> "Session":
        """A multi-turn conversation that keeps its KV cache and DeltaNet state between turns (only the
        new part of each prompt is prefilled). `defaults` (enable_thinking, preserve_thinking, tools,
        sampling parameters) apply to every turn."""
        from .session import Session

        return Session(self, messages=messages, **defaults)

    # ---------------------------------------------------------------- routing
    def record_routing(self) -> Any:
        """Context manager: `with rt.record_routing() as rec: ...`; then `rec.experts` is the int32
        (tokens, layers, top_k) trace of the experts chosen inside the block (tidal.routing)."""
        from . import routing

        return routing.record(self)

    def replay_routing(self, experts: Any) -> Any:
        """Context manager: inside the block every MoE layer uses the trace's experts (looped)
        instead of its router's choice; for benchmarks and cache studies."""
        from . import routing

        return routing.replay(self, experts)

    def trace(self, path: str | os.PathLike | None = None) -> Any:
        """Context manager: record a timeline of every forward call inside the block.

        Spans: per layer the token mixer, router, routed experts and shared expert on the CPU; on
        device="cuda" the GPU segments between host expert calls (CUDA events), the host's waits for
        router ids and the CPU experts. A diagnostic: a mutex per span, CUDA events per step.

        Parameters
        ----------
        path : str, os.PathLike or None
            Where to write the Chrome trace JSON at the end of the block (open it in
            ui.perfetto.dev or chrome://tracing); None keeps it in memory only.

        Returns
        -------
        A context manager yielding a `tidal.tracing.Trace`, whose `events` are filled when the
        block ends: `with rt.trace("step.json") as tr: rt.generate(prompt, max_new_tokens=2)`.
        """
        from .tracing import record

        return record(self, path)

    def set_router_lookahead(self, on: bool = True, predict_k: int | None = None) -> None:
        """Measure router lookahead: at every MoE layer, predict the next MoE layer's experts from
        the hidden state this layer has (the next router on it), and count how many of the experts
        the next layer then routes to were predicted. `stats()` reports precision and recall
        (overall and per layer). Costs one extra norm and router matvec per MoE layer while on.

        Parameters
        ----------
        on : bool
            Start (True) or stop (False) measuring; counts restart with `reset_stats()`.
        predict_k : int or None
            Experts predicted per token, 1 to num_experts (None: the model's top_k); anything else
            is a ValueError.

        On device="cuda" the host predicts from the normed rows it receives for the CPU experts
        (Note [Router lookahead] in core/model/cuda_model.cpp): the same prediction up to rounding;
        not in prompts whose experts are streamed to the GPU.
        """
        self._engine.set_router_lookahead(bool(on), 0 if predict_k is None else int(predict_k))

    # ---------------------------------------------------------------- statistics
    def stats(self) -> Stats:
        """Throughput, where the time went, cache figures and memory since load (or reset_stats())."""
        return Stats.collect(self)

    def reset_stats(self) -> None:
        self._engine.reset_stats()
        self._cached_prompt_tokens = self._prompt_tokens = 0
        self._last = None

    def __repr__(self) -> str:
        return f"Runtime({self.path.name!r}, {self.config.model_type}, device={self.device!r})"


# Re-exported here for type hints in user code.
__all__ += ["GenerationResult", "ChatResult", "Stream", "StreamChunk"]
