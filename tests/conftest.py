"""Shared fixtures: the offline tiny checkpoint (built once per session) and paths to the real sample frames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VLM_DEPTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Folder of the offline tiny Qwen2.5-VL checkpoint (random weights, local tokenizer, real processor)."""
    from vlm_depth.model.tiny import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny_checkpoint(out)
    return out


@pytest.fixture(scope="session")
def arch3b_ckpt(tmp_path_factory) -> Path:
    """The Qwen2.5-VL-3B architecture at reduced depth (published widths and vocabulary, 2 text layers, 2 vision
    blocks, random bf16 weights: 543 M parameters, 1.1 GB), written by `vlm-depth tiny --arch`."""
    from vlm_depth.cli import main

    out = tmp_path_factory.mktemp("arch3b") / "ckpt"
    argv = ["tiny", "--arch", "qwen2.5-vl-3b", "--arch_layers", "2", "--arch_vision_depth", "2", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real RGB-D frames); tests that need it are skipped with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample frames not found at {SHARED_DATA} (set VLM_DEPTH_SHARED_DATA)")
    return SHARED_DATA
