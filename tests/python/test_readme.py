# SPDX-License-Identifier: Apache-2.0
"""The README's Python quick start runs as written (from the repository root, on tidal-mini)."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_quick_start_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "rt.session(preserve_thinking=True" in code and "stream=True" in code
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prompt tokens reused" in p.stdout and "decode" in p.stdout
