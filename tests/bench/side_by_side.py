# SPDX-License-Identifier: Apache-2.0
"""Ratio table of tidal.bench and llama-bench results (tests/bench/run_device_llama_cpp.sh).

    python3 tests/bench/side_by_side.py OUT_DIR
    python3 tests/bench/side_by_side.py OUT_DIR_A OUT_DIR_B --extrapolate 40

Reads OUT_DIR/tidal_{int4,int8}.json (python -m tidal.bench --json) and OUT_DIR/llama_{q4_k,q8_0}.json
(llama-bench -o json) and prints a markdown table: tok/s of each engine per test (tidal: median of
the repetitions with min-max; llama.cpp: mean with standard deviation, as llama-bench reports, of
its fastest configuration for that test, and where each micro-batch ran on its own with its own
VRAM trace, also its fastest within tidal's cap),
tidal / llama.cpp (tidal's median over llama.cpp's mean), and for tg tidal's fraction of its
memory-bandwidth bound. VRAM: tidal's own accounting at load (memory_report "used": weights and
workspaces, before any KV cache) and, like for like, the largest nvidia-smi reading during each
engine's run minus the reading before it started.

With two result folders of the same model at two layer counts (tidal.synth --layers) and
`--extrapolate N`, it also prints both engines' tok/s extrapolated to N layers: the time per token is
fixed (embedding, lm_head, sampling, launch) plus the same cost for every block of layers, so two
layer counts determine the line t(L) = a + b L (the layer counts should be multiples of the 4-layer
pattern). The extrapolation amplifies noise by about N / (L_B - L_A); read it as an estimate.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

PAIRS = [("int4", "q4_k", "INT4 class (tidal int4 g64 / llama.cpp Q4_K)"),
         ("int8", "q8_0", "INT8 class (tidal int8 g128 / llama.cpp Q8_0)")]


def _vram(path: pathlib.Path) -> float | None:
    try:
        vals = [float(x) for x in path.read_text().split() if x.strip()]
    except (OSError, ValueError):
        return None
    return (max(vals) - vals[0]) / 1024 if len(vals) > 1 else None


def _gib(size: str) -> float | None:
    """'12GiB' / '11.5 GiB' / '12GB' -> GiB (None if it does not parse)."""
    s = size.strip().replace(" ", "")
    for unit, f in (("GiB", 1.0), ("GB", 1e9 / 2**30), ("MiB", 1 / 1024)):
        if s.endswith(unit):
            try:
                return float(s[: -len(unit)]) * f
            except ValueError:
                return None
    return None


def _rates(out: pathlib.Path) -> tuple[int, dict[tuple[str, str], float]]:
    """Layer count and {(engine/class, test): tok/s} of one result folder (llama.cpp: best config)."""
    rates: dict[tuple[str, str], float] = {}
    layers = 0
    for td, q, _ in PAIRS:
        t = json.loads((out / f"tidal_{td}.json").read_text())
        layers = t["model"]["layers"]
        for r in t["results"]:
            rates[(f"tidal {td}", r["test"].split("@")[0])] = r["tok_s_median"]
        for r in json.loads((out / f"llama_{q}.json").read_text()):
            name = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
            rates[(f"llama.cpp {q}", name)] = max(rates.get((f"llama.cpp {q}", name), 0.0), r["avg_ts"])
    return layers, rates


def extrapolate(a: pathlib.Path, b: pathlib.Path, n: int) -> str:
    la, ra = _rates(a)
    lb, rb = _rates(b)
    if la == lb:
        raise SystemExit("--extrapolate needs results at two different layer counts")
    est = {}
    for key in ra.keys() & rb.keys():
        ta, tb = 1 / ra[key], 1 / rb[key]  # seconds per token
        slope = (tb - ta) / (lb - la)
        est[key] = 1 / (ta + slope * (n - la))
    lines = [f"### Extrapolated to {n} layers (from {la} and {lb})", "",
             "| test | class | tidal tok/s | llama.cpp tok/s | tidal / llama.cpp |", "|---|---|---:|---:|---:|"]
    for test in sorted({k[1] for k in est}, key=lambda x: (x[:2], int(x[2:]))):
        for td, q, _ in PAIRS:
            t, ll = est.get((f"tidal {td}", test)), est.get((f"llama.cpp {q}", test))
            if t and ll:
                lines.append(f"| {test} | {td} / {q} | {t:.1f} | {ll:.1f} | {t / ll:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--extrapolate" in argv:
        i = argv.index("--extrapolate")
        n = int(argv[i + 1])
        dirs = [pathlib.Path(x) for x in argv[1:i] + argv[i + 2:]]
        if len(dirs) != 2:
            raise SystemExit("usage: side_by_side.py OUT_A OUT_B --extrapolate N")
        print(extrapolate(dirs[0], dirs[1], n))
        return 0
    out = pathlib.Path(argv[1] if len(argv) > 1 else "bench-out")
    lines = []
    for td, q, label in PAIRS:
        tp, lp = out / f"tidal_{td}.json", out / f"llama_{q}.json"
        if not tp.exists() or not lp.exists():
            lines.append(f"{label}: missing {tp.name if not tp.exists() else lp.name}\n")
            continue
        t = json.loads(tp.read_text())
        lrows = json.loads(lp.read_text())
        cap = _gib(str(t["caps"].get("gpu_memory", "")))
        llama: dict[str, Any] = {}  # the fastest llama.cpp configuration of each test
        within: dict[str, Any] = {}  # ... of those whose own VRAM peak stayed within the cap
        for r in lrows:
            name = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
            if name not in llama or r["avg_ts"] > llama[name]["avg_ts"]:
                llama[name] = r
            peak = r.get("vram_peak_over_idle_gib")
            if cap and peak is not None and peak <= cap and (
                    name not in within or r["avg_ts"] > within[name]["avg_ts"]):
                within[name] = r
        m = t["model"]
        vram_t = (t.get("gpu_memory") or {}).get("used")
        vram_l = _vram(out / f"vram_llama_{q}.txt")
        vram_ts = _vram(out / f"vram_tidal_{td}.txt")
        desc = (f"model: {m['model_type']} x{m['layers']} layers at full width (tidal checkpoint "
                f"{m['weight_bytes'] / 2**30:.1f} GiB: {', '.join(sorted(m.get('dtypes', {})))}); llama.cpp file "
                f"{lrows[0]['model_size'] / 2**30:.2f} GiB ({lrows[0]['model_type']}); threads {t['caps']['cpu_threads']}")
        if vram_t:
            desc += f"; tidal VRAM at load {vram_t / 2**30:.2f} GiB by its own accounting (cap {t['caps']['gpu_memory']})"
        if vram_ts is not None:
            desc += f"; nvidia-smi peak over idle: tidal {vram_ts:.2f} GiB"
        if vram_l is not None:
            desc += f"{',' if vram_ts is not None else '; nvidia-smi peak over idle:'} llama.cpp {vram_l:.2f} GiB"
        def cell(lr: dict[str, Any] | None) -> str:
            if lr is None:
                return "-"
            peak = lr.get("vram_peak_over_idle_gib")
            at = f", {peak:.2f} GiB" if peak is not None else ""
            return f"{lr['avg_ts']:.1f} ± {lr['stddev_ts']:.1f} (ub {lr['n_ubatch']}{at})"

        per_run = any("vram_peak_over_idle_gib" in r for r in lrows)
        if per_run:  # one llama-bench run per micro-batch, each with its own VRAM peak
            lines += [f"### {label}", "", desc, "",
                      f"| test | tidal tok/s (min-max) | llama.cpp within the cap ({t['caps'].get('gpu_memory')}) "
                      "| tidal / it | llama.cpp fastest (any VRAM) | tidal / it | tidal of its bound |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
        else:
            lines += [f"### {label}", "", desc, "",
                      "| test | tidal tok/s (min-max) | llama.cpp tok/s (± sd, best micro-batch) | tidal / llama.cpp | tidal of its bound |",
                      "|---|---:|---:|---:|---:|"]
        for r in t["results"]:
            name = r["test"].split("@")[0]
            lr = llama.get(name)
            if lr is None:
                continue
            ratio = r["tok_s_median"] / lr["avg_ts"]
            frac = f"{100 * r['fraction_of_bound']:.0f}%" if "fraction_of_bound" in r else "-"
            td_cell = f"{r['tok_s_median']:.1f} ({r['tok_s_min']:.1f}-{r['tok_s_max']:.1f})"
            if per_run:
                wr = within.get(name)
                wratio = f"{r['tok_s_median'] / wr['avg_ts']:.2f}x" if wr else "-"
                lines.append(f"| {name} | {td_cell} | {cell(wr)} | {wratio} | {cell(lr)} | {ratio:.2f}x | {frac} |")
            else:
                lines.append(f"| {name} | {td_cell} | "
                             f"{lr['avg_ts']:.1f} ± {lr['stddev_ts']:.1f} (ub {lr['n_ubatch']}) | {ratio:.2f}x | {frac} |")
        lines.append("")
    s = json.loads((out / f"tidal_{PAIRS[0][0]}.json").read_text())["system"] if (out / "tidal_int4.json").exists() else {}
    if s:
        lines.append(f"machine: {s.get('cpu')}, {s.get('gpu')} (driver {s.get('driver')}); tidal {s.get('commit')}")
    print("\n".join(x for x in lines if x is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
