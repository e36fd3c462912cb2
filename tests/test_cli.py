"""The CLI lists the commands of DESIGN.md and parses configs with file + override precedence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlm_depth.cli import SynthConfig
from vlm_depth.config import parse_config
from vlm_depth.errors import ConfigError


def test_help_lists_every_design_command():
    out = subprocess.run([sys.executable, "-m", "vlm_depth", "--help"], capture_output=True, text=True, check=True)
    for name in ["demo", "tiny", "synth", "train", "complete", "eval", "bench"]:
        assert f"  {name} " in out.stdout


def test_cli_overrides_win_over_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num: 3\nseed: 7\n")
    cfg = parse_config(SynthConfig, ["--config", str(path), "--num", "5"])
    assert (cfg.num, cfg.seed) == (5, 7)


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nmu: 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config(SynthConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="unknown arguments"):
        parse_config(SynthConfig, ["--nmu", "3"])


def test_unknown_command_exits_nonzero():
    out = subprocess.run([sys.executable, "-m", "vlm_depth", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_log_level_shows_progress_lines_by_default_and_hides_them_on_request(tmp_path, capsys):
    from vlm_depth.cli import main

    args = ["synth", "--num", "1", "--height", "48", "--width", "64", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "INFO vlm_depth.data.synthetic: synth: 1 frames" in capsys.readouterr().err
    assert main(["--log_level", "warning", *args, "--out", str(tmp_path / "b")]) == 0
    assert "synth: 1 frames" not in capsys.readouterr().err
    assert main([*args, "--log_level=loud"]) == 2
    assert "error: --log_level must be one of" in capsys.readouterr().err
