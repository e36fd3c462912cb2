"""`vlm-depth demo`: the whole pipeline end to end on a reduced budget writes every output, its report lists every
baseline and the model with finite numbers, and its verdict says plainly which baselines beat the model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from vlm_depth.cli import main
from vlm_depth.config import save_config
from vlm_depth.data import load
from vlm_depth.demo.demo_config import DemoConfig, model_name, readouts, supervisions
from vlm_depth.demo.report import README_BEGIN, README_END, readme_block, results_section, verdict
from vlm_depth.demo.run import REAL_ENTRIES, prepare_out, real_entries, real_root, run_demo
from vlm_depth.errors import ConfigError
from vlm_depth.eval.baselines import BASELINES


def _cell(method: str, mae: float | None, fill_mae: float | None) -> dict:
    return {"method": method, "mae": mae, "fill": {"mae": fill_mae}}


def _named(segment: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", segment))


def _split_verdict(line: str) -> dict[str, set[str]]:
    """Baselines named per clause of one verdict sentence: {"loses to": {...}, "ties with": ..., "beats": ...,
    "cannot be compared with": ...}."""
    _, _, rest = line.partition(" m) ")
    clauses = {}
    for clause in rest.rstrip(".").split("; "):
        verb = next(v for v in ("loses to", "ties with", "beats", "cannot be compared with") if clause.startswith(v))
        clauses[verb] = _named(clause)
    return clauses


def test_verdict_names_exactly_the_baselines_with_lower_mae():
    results = [
        _cell("nearest", 0.10, 0.30),
        _cell("linear", 0.20, 0.50),
        _cell("median", 0.90, 2.00),
        _cell("model", 0.15, 0.60),
    ]
    all_line, fill_line = verdict(results, ["model"])
    assert "all evaluated pixels" in all_line and "fill pixels" in fill_line
    assert _split_verdict(all_line) == {"loses to": {"nearest"}, "beats": {"linear", "median"}}
    assert _split_verdict(fill_line) == {"loses to": {"nearest", "linear"}, "beats": {"median"}}


def test_verdict_says_every_baseline_names_ties_and_never_counts_missing_values():
    results = [_cell("nearest", 0.1, 0.2), _cell("median", 0.5, None), _cell("model", 0.9, 0.2)]
    all_line, fill_line = verdict(results, ["model"])
    assert "loses to every baseline:" in all_line
    assert _split_verdict(all_line) == {"loses to": {"nearest", "median"}}
    assert _split_verdict(fill_line) == {"ties with": {"nearest"}, "cannot be compared with": {"median"}}
    (line,) = verdict([_cell("nearest", 0.1, 0.2), _cell("model", 0.9, float("nan"))], ["model"])[1:]
    assert line == "`model` has no finite MAE over fill pixels (where the sensor failed)."


def test_a_previous_demo_folder_is_reused_with_its_stage_folders_emptied(tmp_path):
    out = tmp_path / "demo"
    save_config(out, DemoConfig(out=str(out)))  # what an interrupted run leaves first
    stale = out / "data" / "train" / "stale_rgb.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    prepare_out(out)
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"


def test_demo_rejects_bad_options_and_a_foreign_output_folder(tmp_path):
    with pytest.raises(ConfigError, match="num_eval"):
        run_demo(DemoConfig(out=str(tmp_path / "a"), num_eval=0))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        run_demo(DemoConfig(out=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_real_frames_are_the_sample_frames_suite_entries_read_from_the_data_folder(shared_data, tmp_path):
    entries = real_entries(shared_data)
    assert [e.name for e in entries] == list(REAL_ENTRIES)
    assert [e.protocols for e in entries] == [("uniform:500",), ("lidar:64",), ("density:0.5",)]
    for entry in entries:
        kind, _, path = entry.spec.partition(":")
        assert Path(path).exists() and Path(path).is_relative_to(shared_data), entry.spec
        assert len(list(load(entry.spec, **entry.options))) >= 1
    assert real_entries(tmp_path) == []  # a folder without the frames: none
    assert real_root(DemoConfig(real_data=""))[0] is None
    assert real_root(DemoConfig(real_data=str(shared_data)))[0] == shared_data
    with pytest.raises(ConfigError, match="train-and-test"):
        real_root(DemoConfig(real_data=str(tmp_path)))


def test_readme_option_needs_a_readme_with_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ConfigError, match="demo results"):
        run_demo(DemoConfig(out=str(tmp_path / "a"), readme=str(readme)))
    with pytest.raises(ConfigError, match="does not exist"):
        run_demo(DemoConfig(out=str(tmp_path / "a"), readme=str(tmp_path / "missing.md")))
    assert not (tmp_path / "a").exists()  # refused before anything is written


def _table_rows(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


@pytest.mark.slow
def test_demo_end_to_end_on_a_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{README_BEGIN}\nold\n{README_END}\n\n## Next\n")
    args = ["--out", str(out), "--train_steps", "6", "--num_train", "4", "--num_eval", "2"]
    args += ["--height", "64", "--width", "96", "--budget_minutes", "3", "--real_data", "", "--readme", str(readme)]
    assert main(["demo", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = DemoConfig(out=str(out), height=64, width=96)
    models = [model_name(r) for r in readouts(cfg)]
    every_model = [model_name(r, s) for s in supervisions(cfg) for r in readouts(cfg)]

    for name in ("report.md", "config.yaml", "train_curve.png", "eval/report.md", "eval/results.csv"):
        assert (out / name).is_file(), name
    assert (out / "data" / "heldout" / "preview.png").is_file()
    assert any((out / "train" / "final").glob("*.safetensors"))

    # Every baseline and every readout of the model, with finite numbers in both tables.
    text = (out / "report.md").read_text()
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    main_table, fill_table = results.split("fill MAE (m)", 1)
    fill_table = fill_table.split("\n\n", 1)[0]
    for table in (main_table, "| fill MAE (m)" + fill_table):
        rows = _table_rows(table)
        assert set(rows) == set(BASELINES) | set(every_model)
        for method, cells in rows.items():
            values = [float(c) for c in cells]
            assert all(math.isfinite(v) for v in values), (method, cells)

    # The verdict (in the report and the summary) matches the measured MAEs.
    metrics = summary["metrics"]
    for line in summary["verdict"]:
        assert line in text
        model = re.match(r"On MAE over .*?, `([^`]+)`", line).group(1)
        key = "mae" if "all evaluated pixels" in line else "fill_mae"
        clauses = _split_verdict(line)
        assert clauses.get("loses to", set()) == {b for b in BASELINES if metrics[b][key] < metrics[model][key]}
        assert clauses.get("beats", set()) == {b for b in BASELINES if metrics[b][key] > metrics[model][key]}
    assert len(summary["verdict"]) == 2 * len(models)

    # The completed held-out frame keeps every valid sensor pixel exactly (keep means keep).
    for readout in readouts(cfg):
        folder = out / "complete" / readout
        depth_npy = next(folder.glob("*_depth.npy"))
        name = depth_npy.name[: -len("_depth.npy")]
        completed = np.load(depth_npy, allow_pickle=False)
        frame = next(s for s in load(f"folder:{out / 'data' / 'heldout'}") if s.name == name)
        valid = frame.depth > 0
        assert completed.shape == frame.depth.shape and np.isfinite(completed).all()
        np.testing.assert_array_equal(completed[valid], frame.depth[valid])
        for suffix in ("_depth.png", "_color.png", "_uncertainty.png", "_compare.png", ".ply"):
            assert (folder / f"{name}{suffix}").is_file(), suffix
    assert set(summary["seconds"]) == {"tiny", "data", "train", "train-gt", "eval", "complete", "report", "total"}

    # The one-line verdict, label-free vs GT gaps that are the differences of the table's values, the real frames
    # skipped with the reason, and the README block that is the report's Results section.
    assert f"**{summary['headline']}**" in results
    best = min(models, key=lambda m: metrics[m]["fill_mae"])
    assert f"`{best}` (label-free), fills the sensor's holes with MAE {metrics[best]['fill_mae']:.3f} m" in results
    gaps = results.split("### Label-free vs ground-truth labels", 1)[1].split("###", 1)[0]
    for readout in readouts(cfg):
        row = next(line for line in gaps.splitlines() if line.startswith(f"| {readout} | fill MAE (m) |"))
        label_free, gt, gap = (float(c) for c in row.strip("|").split("|")[2:])
        assert label_free == pytest.approx(metrics[model_name(readout)]["fill_mae"], abs=5e-4)
        assert gt == pytest.approx(metrics[model_name(readout, "gt")]["fill_mae"], abs=5e-4)
        assert gap == pytest.approx(label_free - gt, abs=1.5e-3)
    assert "### Real frames, zero-shot\n\nSkipped: the real sample frames were not found" in results
    block = readme_block(readme.read_text())
    assert block == results_section(text) and readme.read_text().endswith(f"{README_END}\n\n## Next\n")
