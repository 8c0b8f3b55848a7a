# SPDX-License-Identifier: Apache-2.0
"""Type stubs of the native module (see python/bindings/)."""

import os
from typing import Any, Callable, Iterable, Optional, Sequence as _Seq, Union

import numpy as np
import numpy.typing as npt

__version__: str

TokenIds = Union[_Seq[int], npt.NDArray[np.integer]]

class FormatError(ValueError): ...

class ModelConfig:
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    rope_type: str
    partial_rotary_factor: float
    layer_types: list[str]
    layer_is_moe: list[bool]
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    packed_experts: Optional[dict[str, Any]]  # config.json tidal_packed_experts, or None

class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

class Sampler:
    """Token selection state of one generation: penalties, filters, seeded RNG."""
    def __init__(
        self,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        prompt_ids: TokenIds = ...,
    ) -> None: ...
    def sample(self, logits: npt.ArrayLike) -> int: ...
    def accept(self, token_id: int) -> None: ...
    def penalized(self, logits: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
    def probabilities(self, logits: npt.ArrayLike) -> npt.NDArray[np.float32]: ...

class Sequence:
    num_tokens: int
    checkpoint_positions: list[int]
    def forward(self, token_ids: TokenIds, all_logits: bool = True) -> npt.NDArray[np.float32]:
        """Append tokens; float32 logits (n, vocab) for every new token, or (1, vocab)."""
    def step(self, token_ids: TokenIds, sampler: Sampler) -> int:
        """Append tokens; the next token picked by `sampler` from the last logits (not appended)."""
    def prefill(self, token_ids: TokenIds) -> None: ...
    def checkpoint(self) -> None:
        """Save the DeltaNet states at the current length (at most 8 kept)."""
    def truncate(self, num_tokens: int) -> int:
        """Roll back to at most num_tokens; returns the new length."""

built_with_cuda: bool

def cuda_devices() -> list[str]:
    """Descriptions of the CUDA devices this build can use (empty: none, or built without CUDA)."""

class Runtime:
    config: ModelConfig
    num_threads: int
    device: str
    max_context: int
    @staticmethod
    def load(
        path: Union[str, os.PathLike[str]],
        *,
        device: str = "cpu",
        num_threads: int = 0,
        populate: bool = True,
        expert_dtype: str = "auto",
        expert_group_size: int = 0,
        cpu_isa: str = "auto",
        expert_cache: str = "auto",
        progress: Optional[Callable[[int, int], None]] = None,
        gpu_memory: int = 0,
        gpu_weights: str = "bf16",
        gpu_precision: str = "bf16x2",
        cuda_graphs: bool = True,
        kv_cache_dtype: str = "bf16",
        max_context: int = 0,
        gpu_expert_slots: int = 0,
        gpu_expert_policy: str = "lfu",
    ) -> Runtime: ...
    def memory_report(self) -> dict[str, int]:
        """VRAM use in bytes (device="cuda"): weights, weights_bf16_equivalent, kv_cache,
        deltanet_state, workspaces, used, free, total, limit."""
    def describe(self) -> dict[str, str]:
        """What runs: device, cpu, cpu_isa, cpu_isa_best, expert_dtype, expert_group_size,
        expert_layout, expert_kernels, expert_cache, expert_cache_file, threads, cpu_executor."""
    def logits(self, token_ids: TokenIds) -> npt.NDArray[np.float32]:
        """float32 (len(token_ids), vocab_size): logits at every position of a fresh sequence."""
    def generate(
        self,
        token_ids: TokenIds,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        stop_token_ids: Iterable[int] = (),
    ) -> GenerationResult: ...
    def new_sequence(self) -> Sequence: ...
    def stats(self) -> dict[str, Any]: ...
    def reset_stats(self) -> None: ...
    def set_router_lookahead(self, on: bool, predict_k: int = 0) -> None: ...
    def start_trace(self) -> None: ...
    def stop_trace(self) -> str: ...

def inspect_checkpoint(path: Union[str, os.PathLike[str]]) -> tuple[ModelConfig, list[dict[str, Any]]]: ...
def measure_read_bandwidth(bytes: int = ..., num_threads: int = 0, repeats: int = 3) -> float: ...
def measure_gpu_bandwidth(device: int = 0, bytes: int = ..., repeats: int = 5) -> dict[str, float]:
    """hbm_read_bytes_per_s, pinned_h2d_bytes_per_s, pinned_d2h_bytes_per_s of a CUDA device."""

class PackedExpertsWriter:
    """Writes a pre-packed routed-experts file for a config.json (tidal.synth --expert-dtype int4|int8)."""
    layers_written: int
    layers_expected: int
    def __init__(self, path: str, config: str, dtype: str, group_size: int = 0, num_threads: int = 0) -> None: ...
    def add_layer(self, gate_up: Any, down: Any) -> None: ...
    def finish(self) -> None: ...

class ExpertCacheSchedule:
    """The VRAM expert cache's step rules (offload/expert_schedule.h): which routed experts of a decode step
    the GPU computes from a slot, admissions, when copies are issued and land."""
    slots: int
    fills_issued: int
    fills_kept: int
    frozen: bool
    def __init__(self, layers: int, experts: int, slots: int, policy: str = "lfu", max_fills: int = 16,
                 decay: float = 0.98, static_steps: int = 256) -> None: ...
    def begin_step(self) -> list[tuple[int, int, int]]: ...
    def route(self, layer: int, ids: list[int]) -> tuple[int, list[int]]: ...
    def end_step(self) -> None: ...

class ExpertSlotCache:
    """Slot bookkeeping of the VRAM expert cache (offload/expert_cache.h): which (layer, expert) is in which
    slot, which slot a miss takes, per-layer counters."""
    slots: int
    resident: int
    policy: str
    def __init__(self, layers: int, experts: int, slots: int, policy: str = "lru", decay: float = 0.98,
                 expert_bytes: int = 0) -> None: ...
    def lookup(self, layer: int, experts: list[int]) -> list[int]: ...
    def admit(self, layer: int, expert: int) -> tuple[int, int, int]: ...
    def access(self, layer: int, expert: int) -> bool: ...
    def next_token(self) -> None: ...
    def release_pins(self) -> None: ...
    def set_resident(self, keys: list[tuple[int, int]]) -> None: ...
    def slot_of(self, layer: int, expert: int) -> int: ...
    def expert_in(self, slot: int) -> tuple[int, int]: ...
    def reset_stats(self) -> None: ...
    def stats(self) -> list[dict[str, int]]: ...
    def total(self) -> dict[str, int]: ...
