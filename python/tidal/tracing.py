# SPDX-License-Identifier: Apache-2.0
"""`rt.trace(path)`: a timeline of forward calls as Chrome trace JSON (Note [Step trace] in
core/model/step_trace.cpp). Open the file in https://ui.perfetto.dev or chrome://tracing."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Trace", "record"]


@dataclass
class Trace:
    """What `rt.trace()` recorded. `events`: Chrome trace events ("ph": "X" spans with ts / dur in
    µs from the start of the block, "cat" one of step, gpu, cpu_dense, cpu_experts, waits, copies;
    "tid" 1 is the GPU stream, 2 the expert copies from host to GPU (the VRAM expert cache's fills
    and prefetches, prefill streaming's layers), 3 and up the application threads that ran forward
    calls; args.layer where a span belongs to one layer)."""

    path: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def spans(self, cat: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """The complete events, optionally of one category and/or name."""
        return [e for e in self.events if e.get("ph") == "X" and (cat is None or e["cat"] == cat)
                and (name is None or e["name"] == name)]

    def total_us(self, cat: str) -> float:
        """Summed duration of the spans of a category (nested spans count where they are)."""
        return sum(e["dur"] for e in self.spans(cat))


@contextmanager
def record(rt: Any, path: str | os.PathLike | None = None) -> Iterator[Trace]:
    tr = Trace(path=None if path is None else os.fspath(path))
    rt._engine.start_trace()
    try:
        yield tr
    finally:
        doc = json.loads(rt._engine.stop_trace())
        tr.events = doc["traceEvents"]
        if tr.path is not None:
            with open(tr.path, "w") as f:
                json.dump(doc, f)
