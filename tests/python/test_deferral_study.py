# SPDX-License-Identifier: Apache-2.0
"""Note [Expert deferral study]: TIDAL_STUDY_DEFER_EXPERTS=n adds each token's n lowest-ranked
experts one layer late on the CPU path. n = 0 is the model; n = 1 moves the outputs a little
(tests/bench/deferral_study.py measures how much)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import MINI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(ROOT, "tests", "bench", "deferral_study.py")
TEXT = os.path.join(ROOT, "python", "tidal", "stats.py")


def _run(n: int, out: str) -> tuple[dict, np.ndarray]:
    env = dict(os.environ, TIDAL_STUDY_DEFER_EXPERTS=str(n))
    subprocess.run([sys.executable, STUDY, str(MINI), "--files", TEXT, "--tokens", "160", "--gen", "4",
                    "--worker", out], check=True, env=env)
    return json.load(open(out + ".json")), np.load(out + ".npz")["logits"]


def test_expert_deferral_study_switch(tmp_path):
    import tidal

    base, lg0 = _run(0, str(tmp_path / "d0"))
    rt = tidal.Runtime.load(MINI, progress=False)
    ids = rt.encode(open(TEXT, encoding="utf-8").read())[:160]
    np.testing.assert_array_equal(lg0, rt.logits(ids))  # n = 0: the model itself
    late, lg1 = _run(1, str(tmp_path / "d1"))
    diff = np.abs(lg1 - lg0)
    assert diff.max() > 1e-2  # the deferred experts really arrive late
    d_loss = np.mean(late["nll"][0]) - np.mean(base["nll"][0])
    assert abs(d_loss) < 0.1, d_loss  # a small change of the loss (study: +0.007 nats/token)
    agree = np.mean(np.array(late["top1"][0]) == np.array(base["top1"][0]))
    assert agree > 0.8, agree
