"""The README's Results are what `vlm-depth demo` produces: the default demo runs once, as a user runs it (its own
process, from the repository root), and the README's demo-results block must equal its report's Results section.

On one machine the text is identical from run to run (one thread, fixed seeds). Another CPU or torch build may sum
floating-point numbers in another order, so numbers are compared to 0.5 % (or 0.002 absolute) and all other text
exactly. Without the real frames (../shared/data) the run skips their table: that subsection is then left out of the
comparison, and the rest must still match.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_depth.demo.report import readme_block, results_section

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
REAL = "### Real frames, zero-shot"
REL, ABS = 5e-3, 2e-3


def _subsections(block: str) -> dict[str, str]:
    """{heading: text} of a Results block ("" for the text before the first `### ` heading)."""
    parts = ("\n" + block).split("\n### ")
    return {"": parts[0].strip("\n"), **{p.split("\n", 1)[0]: p.strip("\n") for p in parts[1:]}}


def _close(expected: str, got: str) -> bool:
    """The same words in the same places, and numbers equal to REL (relative) or ABS."""
    if NUMBER.split(expected) != NUMBER.split(got):
        return False
    pairs = list(zip(NUMBER.findall(expected), NUMBER.findall(got), strict=True))
    return all(math.isclose(float(a), float(b), rel_tol=REL, abs_tol=ABS) for a, b in pairs)


@pytest.mark.slow
def test_readme_results_are_what_the_default_demo_produces(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "vlm_depth", "demo", "--out", str(tmp_path / "demo")]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = _subsections(results_section((tmp_path / "demo" / "report.md").read_text()))
    readme = _subsections(readme_block((REPO / "README.md").read_text()))
    heading = REAL.removeprefix("### ")
    if fresh[heading].startswith(f"{heading}\n\nSkipped"):  # no real frames on this machine
        del fresh[heading], readme[heading]
    assert fresh.keys() == readme.keys()
    for key in fresh:
        diff = "\n".join(difflib.unified_diff(readme[key].splitlines(), fresh[key].splitlines(), lineterm=""))
        assert _close(readme[key], fresh[key]), f"README section {key!r} differs from a fresh demo run:\n{diff}"
