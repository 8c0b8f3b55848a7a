# SPDX-License-Identifier: Apache-2.0
"""tests/bench/side_by_side.py: the ratio table and the --layers extrapolation, on hand-made results
(the real ones come from the GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "tests" / "bench" / "side_by_side.py")
sbs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbs)


def _write(d: pathlib.Path, layers: int, tidal: dict, llama: dict) -> None:
    d.mkdir(parents=True)
    for td, q in (("int4", "q4_k"), ("int8", "q8_0")):
        results = [{"test": k if k.startswith("pp") else f"{k}@d0", "tok_s_median": v, "tok_s_min": v, "tok_s_max": v}
                   for k, v in tidal[td].items()]
        results[-1]["fraction_of_bound"] = 0.5
        (d / f"tidal_{td}.json").write_text(json.dumps({
            "model": {"model_type": "qwen3_5_moe_text", "layers": layers, "weight_bytes": 2**30, "dtypes": {"BF16": 1}},
            "caps": {"cpu_threads": 16, "gpu_memory": "12GiB"}, "gpu_memory": {"used": 2**30},
            "system": {"cpu": "cpu", "gpu": "gpu", "driver": "1", "commit": "abc"}, "results": results}))
        rows = []
        for k, vals in llama[q].items():
            for ub, v in vals:
                rows.append({"n_prompt": int(k[2:]) if k.startswith("pp") else 0,
                             "n_gen": int(k[2:]) if k.startswith("tg") else 0, "n_ubatch": ub, "avg_ts": v,
                             "stddev_ts": 1.0, "model_size": 2**30, "model_type": "qwen35moe Q4_K"})
        (d / f"llama_{q}.json").write_text(json.dumps(rows))
    (d / "vram_llama_q4_k.txt").write_text("1024\n3072\n2048\n")


def test_table_takes_llama_cpps_fastest_config_and_divides(tmp_path, capsys):
    _write(tmp_path / "a", 8, {"int4": {"pp512": 100.0, "tg128": 30.0}, "int8": {"pp512": 80.0, "tg128": 20.0}},
           {"q4_k": {"pp512": [(512, 50.0), (2048, 200.0)], "tg128": [(512, 10.0), (2048, 15.0)]},
            "q8_0": {"pp512": [(512, 40.0)], "tg128": [(512, 10.0)]}})
    assert sbs.main(["x", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| pp512 | 100.0 (100.0-100.0) | 200.0 ± 1.0 (ub 2048) | 0.50x | - |" in out
    assert "| tg128 | 30.0 (30.0-30.0) | 15.0 ± 1.0 (ub 2048) | 2.00x | 50% |" in out
    assert "| tg128 | 20.0 (20.0-20.0) | 10.0 ± 1.0 (ub 512) | 2.00x | 50% |" in out
    assert "llama.cpp 2.00 GiB" in out  # nvidia-smi peak 3072 MiB over the idle 1024 MiB


def test_extrapolation_is_linear_in_time_per_token(tmp_path):
    # time per token a + b L: tidal tg 1/(1 + 0.25 L) ms-units, llama.cpp 1/(0.5 + 0.5 L)
    def rates(layers, a, b):
        return 1.0 / (a + b * layers)

    for L in (4, 8):
        t = {"int4": {"tg128": rates(L, 1, 0.25)}, "int8": {"tg128": rates(L, 1, 0.5)}}
        ll = {"q4_k": {"tg128": [(512, rates(L, 0.5, 0.5))]}, "q8_0": {"tg128": [(512, rates(L, 0.5, 1.0))]}}
        _write(tmp_path / f"L{L}", L, t, ll)
    text = sbs.extrapolate(tmp_path / "L4", tmp_path / "L8", 40)
    line = next(x for x in text.splitlines() if x.startswith("| tg128 | int4"))
    ratio = float(line.split("|")[5].strip().rstrip("x"))
    assert ratio == pytest.approx(rates(40, 1, 0.25) / rates(40, 0.5, 0.5), abs=0.01)
    with pytest.raises(SystemExit, match="two different layer counts"):
        sbs.extrapolate(tmp_path / "L4", tmp_path / "L4", 40)
