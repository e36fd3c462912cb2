"""`vlm-depth demo`: the main job on the embedded default, end to end on a CPU in minutes.

Every stage is one library call, the same code path as the command of the same name, and is timed:

1. `tiny`      the offline tiny Qwen2.5-VL (`build_tiny_checkpoint`)                                -> OUT/tiny
2. `data`      synthetic frames with simulated stereo-sensor failures (`write_synthetic`): a training set, and a
               held-out set from another seed, in the folder format                      -> OUT/data/{train,heldout}
3. `train`     label-free training with a recipe of top-level `train/` (`run_train`): the labels are held-out
               sensor points, never the ground truth; with `mdm`, the MDM head trains jointly   -> OUT/train/final
4. `train-gt`  with `gt_labels`: the same recipe, seed and data with ground-truth labels          -> OUT/train-gt/final
5. `eval`      every classical baseline and the models' readouts on the held-out frames under the `sensor`
               protocol: the input is the simulated sensor depth, the reference the ray-cast ground truth
               (`run_suite`; label-free vs GT compared per metric)                               -> OUT/eval
6. `real`      zero-shot on the real frames of `real_data` (NYUv2 Kinect, KITTI LiDAR), when present: the
               baselines and the label-free readouts, inputs as `eval/sample_frames.yaml` states    -> OUT/real
7. `complete`  the first held-out frame through `run_complete` (all of its outputs), per readout -> OUT/complete
8. `report`    OUT/report.md (`vlm_depth.demo.report`): a one-line verdict, metric tables (all, fill and keep
               pixels), label-free vs GT gaps, the real-frame table, the training curve, pictures, timings and the
               hardware; with `readme`, its Results section goes into the README.

The model is tiny and starts from random weights; the report says in plain words which baselines each readout
loses to, ties with and beats. The demo shows that the pipeline works end to end, not what the method achieves with
a pretrained Qwen2.5-VL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_depth.config import load_config, save_config
from vlm_depth.demo.demo_config import (
    PROTOCOL,
    DemoConfig,
    Supervision,
    model_name,
    readouts,
    supervisions,
    train_folder,
)
from vlm_depth.demo.report import (
    headline,
    minutes,
    plot_training_curve,
    readme_block,
    update_readme,
    verdict,
    write_report,
)
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.eval import report
from vlm_depth.resources import REPO_ROOT, load_yaml

if TYPE_CHECKING:
    from vlm_depth.eval.suite import DatasetEntry, Method
    from vlm_depth.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

STAGE_DIRS = ("tiny", "data", "train", "train-gt", "eval", "real", "complete")
DATASET_NAME = "synthetic-heldout"
# The real frames of the zero-shot table: entries of the shipped suite eval/sample_frames.yaml (their reader options
# and the first of their protocols), read from `real_data`. NYUv2: 500 points sampled from the Kinect depth (the
# standard NYUv2 completion input); KITTI DC: 64 LiDAR lines simulated on the annotated ground truth; the KITTI
# object frame: its real HDL-64 scan, half of whose points are held out as the reference.
REAL_ENTRIES = ("nyuv2-sync", "kitti-dc-gt", "kitti-lidar-scan")
REAL_SUITE = "sample_frames"
REAL_PRESET = "fast"  # the query readout's 1024-query grid: real frames are up to 1242x375 pixels


class StageClock:
    """Wall-clock seconds and CPU seconds of this process (all its threads) per named stage, with a progress bar
    over the stages. On a shared machine the CPU seconds say how much work a stage was, the wall clock how long it
    waited for the cores too."""

    def __init__(self, names: Sequence[str]) -> None:
        from tqdm.auto import tqdm

        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc="demo", unit="stage")
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"demo: {name}")
        logger.info("demo stage %s", name)
        tic, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = time.perf_counter() - tic
        self.cpu_seconds[name] = time.process_time() - cpu
        self.bar.update(1)

    def total(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self.bar.close()


def _check(cfg: DemoConfig) -> None:
    for name in ("train_steps", "num_train", "num_eval"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"demo: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ConfigError(f"demo: seed must be >= 0 (synthetic streams are indexed by it), got {cfg.seed}")
    if cfg.budget_minutes <= 0:
        raise ConfigError(f"demo: budget_minutes must be > 0, got {cfg.budget_minutes}")
    if cfg.readme:
        readme = Path(cfg.readme)
        if not readme.is_file():
            raise ConfigError(f"demo: --readme {readme} does not exist")
        readme_block(readme.read_text(encoding="utf-8"), str(readme))


def prepare_out(out: Path) -> None:
    """Create `out`, or empty the stage folders of a previous (finished or interrupted) demo run in it; refuse any
    other non-empty folder. So a stale frame or checkpoint never leaks into this run and no user file is deleted."""
    if out.is_dir() and any(out.iterdir()):
        config = out / "config.yaml"
        previous = config.is_file() and {"num_train", "num_eval", "train_steps"} <= set(load_yaml(config))
        if not previous:
            raise ConfigError(f"demo: {out} is not empty and holds no previous demo run; choose another --out")
        for name in STAGE_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def train_config(cfg: DemoConfig, out: Path, supervision: Supervision = "sparse") -> TrainConfig:
    """The `vlm-depth train` config of the demo: the recipe, with the demo's model, data, labels (`sparse`:
    held-out sensor points; `gt`: ground truth), steps, seed and output."""
    from vlm_depth.train.train_config import TrainConfig

    mdm = {"mdm_mode": "joint"} if cfg.mdm else {}  # the head itself (width, pyramid, mixture, lr) is the recipe's
    return dataclasses.replace(
        load_config(TrainConfig, cfg.recipe),
        model=str(out / "tiny"),
        dataset=f"folder:{out / 'data' / 'train'}",
        num_images=0,
        val_dataset=f"synthetic:4?seed={cfg.seed + 2}&height={cfg.height}&width={cfg.width}",
        label_source=supervision,
        protocol=PROTOCOL,
        max_steps=cfg.train_steps,
        seed=cfg.seed,
        out=str(out / train_folder(supervision)),
        **mdm,
    )


def _train(cfg: DemoConfig, out: Path, supervision: Supervision) -> dict[str, Any]:
    from vlm_depth.train.trainer import run_train

    summary = run_train(train_config(cfg, out, supervision))
    if not summary.get("final"):
        raise ModelError(f"demo: training in {out / train_folder(supervision)} finished without a final checkpoint")
    return summary


def _model_methods(cfg: DemoConfig, checkpoints: dict[str, str], preset: str = "") -> list[Method]:
    from vlm_depth.eval.suite import model_method

    return [
        model_method(checkpoints[s], r, name=model_name(r, s), preset=preset if r == "query" else "")
        for s in checkpoints
        for r in readouts(cfg)
    ]


def _run_cells(
    cfg: DemoConfig, out: Path, folder: str, entries: list[DatasetEntry], methods: list[Method], compare=()
) -> list[dict[str, Any]]:
    """`run_suite` into OUT/`folder`; returns the cell results (metrics.json dicts, plus `panels`: compare panels
    relative to OUT), per dataset in the order of the methods."""
    from vlm_depth.eval.eval_config import EvalConfig
    from vlm_depth.eval.runner import run_suite
    from vlm_depth.eval.suite import Suite

    suite = Suite(entries, methods, list(compare))
    summary = run_suite(suite, EvalConfig(out=str(out / folder), seed=cfg.seed, panels=1))
    if summary["skipped"]:
        reasons = "; ".join(f"{s['dataset']} {s['method']}: {s['reason']}" for s in summary["skipped"])
        raise ModelError(f"demo: evaluation cells failed: {reasons}")
    cells = {}
    for path in (out / folder).glob("*/*/*/metrics.json"):
        cell = json.loads(path.read_text())
        cell["panels"] = [str(p.relative_to(out)) for p in sorted(path.parent.glob("compare_*.png"))]
        cells[(cell["dataset_name"], cell["method"])] = cell
    return [cells[(e.name, m.name)] for e in entries for m in methods]


def _evaluate(cfg: DemoConfig, out: Path, checkpoints: dict[str, str]) -> list[dict[str, Any]]:
    """Every baseline and the models' readouts on the held-out frames (label-free vs GT compared per readout)."""
    from vlm_depth.eval.suite import DatasetEntry, baseline_methods

    entry = DatasetEntry(spec=f"folder:{out / 'data' / 'heldout'}", name=DATASET_NAME, protocols=(PROTOCOL,))
    compare = [(model_name(r), model_name(r, "gt")) for r in readouts(cfg)] if "gt" in checkpoints else []
    methods = baseline_methods("all") + _model_methods(cfg, checkpoints)
    return _run_cells(cfg, out, "eval", [entry], methods, compare)


def real_root(cfg: DemoConfig) -> tuple[Path | None, str]:
    """The folder of the real frames (holding `train-and-test/`) and how it was found, or None and why not."""
    if not cfg.real_data:
        return None, "`--real_data ''` turned the real frames off"
    if cfg.real_data != "auto":
        root = Path(cfg.real_data)
        if not (root / "train-and-test").is_dir():
            raise ConfigError(f"demo: --real_data {root} has no train-and-test/ folder")
        return root, f"`--real_data {root}`"
    candidates = [Path(os.environ["VLM_DEPTH_SHARED_DATA"])] if os.environ.get("VLM_DEPTH_SHARED_DATA") else []
    candidates += [Path("..") / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    for root in candidates:
        if (root / "train-and-test").is_dir():
            return root, f"`{root}`"
    return None, "no `train-and-test/` folder at " + ", ".join(f"`{c}`" for c in candidates)


def real_entries(root: Path) -> list[DatasetEntry]:
    """The `REAL_ENTRIES` of the `REAL_SUITE` suite, read from `root` (those whose folder exists), each with its
    first protocol."""
    from vlm_depth.eval.suite import load_suite

    entries = []
    for entry in load_suite(REAL_SUITE).datasets:
        kind, _, path = entry.spec.partition(":")
        folder = root / Path(path).relative_to(Path("..") / "shared" / "data")
        if entry.name in REAL_ENTRIES and folder.exists():
            entries.append(dataclasses.replace(entry, spec=f"{kind}:{folder}", protocols=entry.protocols[:1]))
    return entries


def _evaluate_real(cfg: DemoConfig, out: Path, entries: list[DatasetEntry], checkpoint: str) -> list[dict[str, Any]]:
    from vlm_depth.eval.suite import baseline_methods

    methods = baseline_methods("all") + _model_methods(cfg, {"sparse": checkpoint}, preset=REAL_PRESET)
    return _run_cells(cfg, out, "real", entries, methods)


def _complete(cfg: DemoConfig, out: Path, checkpoint: str) -> dict[str, dict[str, Any]]:
    from vlm_depth.infer.complete_config import CompleteConfig
    from vlm_depth.infer.run_complete import run_complete

    heldout = f"folder:{out / 'data' / 'heldout'}"
    summaries = {}
    for readout in readouts(cfg):
        target = out / "complete" / readout
        complete_cfg = CompleteConfig(model=checkpoint, dataset=heldout, limit=1, out=str(target), readout=readout)
        summaries[readout] = run_complete(complete_cfg)
    return summaries


def machine() -> dict[str, Any]:
    """Hardware and load of this machine, for reading the timings."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count() or 1
    return {
        "cpu": f"{cores}-core {platform.machine()} CPU",
        "gpu": gpu,
        "hardware": f"{cores}-core {platform.machine()} CPU, " + (f"GPU {gpu}" if gpu else "no GPU"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """`vlm-depth demo`: run the stages of the module docstring into `cfg.out`; returns where everything is, the
    headline metrics per method, the verdict and the timings."""
    from vlm_depth.data.synthetic import write_synthetic
    from vlm_depth.model.tiny import build_tiny_checkpoint

    _check(cfg)
    out = Path(cfg.out)
    root, found = real_root(cfg)
    entries = real_entries(root) if root else []
    if root and not entries:
        root, found = None, f"none of {list(REAL_ENTRIES)} under `{root}`"
    prepare_out(out)
    save_config(out, cfg)
    host = machine()
    trainings = supervisions(cfg)
    stages = ["tiny", "data", *(train_folder(s) for s in trainings), "eval", *(["real"] if entries else [])]
    clock = StageClock([*stages, "complete", "report"])
    try:
        with clock.stage("tiny"):
            tiny = build_tiny_checkpoint(out / "tiny", seed=cfg.seed)
        with clock.stage("data"):
            size = {"height": cfg.height, "width": cfg.width}
            data = {
                "train": write_synthetic(out / "data" / "train", cfg.num_train, seed=cfg.seed, **size),
                "heldout": write_synthetic(
                    out / "data" / "heldout", cfg.num_eval, seed=cfg.seed + 1, preview=True, **size
                ),
            }
        train = {}
        for supervision in trainings:
            with clock.stage(train_folder(supervision)):
                train[supervision] = _train(cfg, out, supervision)
        checkpoints = {s: summary["final"] for s, summary in train.items()}
        with clock.stage("eval"):
            results = _evaluate(cfg, out, checkpoints)
        real: dict[str, Any] = {"found": found, "entries": entries, "results": []}
        if entries:
            with clock.stage("real"):
                real["results"] = _evaluate_real(cfg, out, entries, checkpoints["sparse"])
        with clock.stage("complete"):
            completions = _complete(cfg, out, checkpoints["sparse"])
        with clock.stage("report"):
            curve = plot_training_curve(out / "train" / "log.jsonl", out / "train_curve.png")
            seconds = dict(clock.seconds)
            total = clock.total()
            end = machine()
            host.update(load_end=end["load_average"], threads_end=end["threads"])
            path = write_report(
                out / "report.md",
                cfg,
                results=results,
                real=real,
                tiny=tiny,
                data=data,
                train=train,
                completions=completions,
                seconds=seconds,
                cpu=dict(clock.cpu_seconds),
                total=total,
                host=host,
                curve=curve,
            )
            if cfg.readme:
                update_readme(Path(cfg.readme), path)
    finally:
        clock.close()
    total = clock.total()
    if total > 60 * cfg.budget_minutes:
        logger.warning("demo took %s, over its %g-minute budget", minutes(total), cfg.budget_minutes)
    models = [model_name(r) for r in readouts(cfg)]
    return report.jsonable(
        {
            "out": str(out),
            "report": str(path),
            "checkpoints": checkpoints,
            "evaluation": str(out / "eval" / "report.md"),
            "real_frames": str(out / "real" / "report.md") if entries else None,
            "completed": {r: s["out"] for r, s in completions.items()},
            "metrics": {
                r["method"]: {"mae": r["mae"], "rmse": r["rmse"], "fill_mae": r["fill"]["mae"]} for r in results
            },
            "headline": headline(results, cfg),
            "verdict": verdict(results, models),
            "seconds": {**clock.seconds, "total": total},
            "cpu_seconds": dict(clock.cpu_seconds),
            "within_budget": total <= 60 * cfg.budget_minutes,
            "hardware": host["hardware"],
            "readme": cfg.readme or None,
        }
    )
