# SPDX-License-Identifier: Apache-2.0
"""Notebook helpers: `plot_stats(rt.stats())` draws throughput, where the time went and memory.

matplotlib is an optional dependency (`pip install matplotlib`, or the `notebook` extra).
"""

from __future__ import annotations

from typing import Any

from .stats import Stats

__all__ = ["plot_stats"]


def plot_stats(stats: Stats, axes: Any = None) -> Any:
    """Three panels: prefill/decode tok/s, time split (gpu, cpu_experts, cpu_dense, sampling, copies,
    waits) and memory. Returns the matplotlib Figure."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_stats needs matplotlib: pip install matplotlib") from None
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    else:
        fig = axes[0].figure
    a0, a1, a2 = axes
    a0.bar(["prefill", "decode"], [stats.prefill_tokens_per_second, stats.decode_tokens_per_second],
           color=["#4c72b0", "#dd8452"])
    a0.set_ylabel("tokens / s")
    a0.set_title(f"throughput ({stats.device})")
    parts = {k: v for k, v in stats.time.items() if v > 0}
    a1.bar(list(parts), list(parts.values()), color="#55a868")
    a1.set_ylabel("seconds")
    a1.set_title("where the time went")
    a1.tick_params(axis="x", labelrotation=30)
    mem = {k: v / 2**20 for k, v in stats.memory.items() if v}
    a2.barh(list(mem), list(mem.values()), color="#8172b3")
    a2.set_xlabel("MiB")
    a2.set_title("memory")
    fig.tight_layout()
    return fig
