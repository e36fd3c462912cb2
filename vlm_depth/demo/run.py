"""`vlm-depth demo`: the main job on the embedded default, end to end on a CPU in minutes.

Every stage is one library call, the same code path as the command of the same name, and is timed:

1. `tiny`      the offline tiny Qwen2.5-VL (`build_tiny_checkpoint`)                                -> OUT/tiny
2. `data`      synthetic frames with simulated stereo-sensor failures (`write_synthetic`): a training set, and a
               held-out set from another seed, in the folder format                      -> OUT/data/{train,heldout}
3. `train`     label-free training with a recipe of top-level `train/` (`run_train`): the labels are held-out
               sensor points, never the ground truth; with `mdm`, the MDM head trains jointly   -> OUT/train/final
4. `eval`      every classical baseline and the model's readout(s) on the held-out frames under the `sensor`
               protocol: the input is the simulated sensor depth, the reference the ray-cast ground truth
               (`run_suite`)                                                                     -> OUT/eval
5. `complete`  the first held-out frame through `run_complete` (all of its outputs), per readout -> OUT/complete
6. `report`    OUT/report.md (`vlm_depth.demo.report`): metric tables (all, fill and keep pixels), a plain verdict
               of the model against every baseline, the training curve, pictures, timings and the hardware.

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
from vlm_depth.demo.demo_config import PROTOCOL, DemoConfig, model_name, readouts
from vlm_depth.demo.report import minutes, plot_training_curve, verdict, write_report
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.eval import report
from vlm_depth.resources import load_yaml

if TYPE_CHECKING:
    from vlm_depth.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

STAGES = ("tiny", "data", "train", "eval", "complete", "report")
STAGE_DIRS = ("tiny", "data", "train", "eval", "complete")
DATASET_NAME = "synthetic-heldout"


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


def train_config(cfg: DemoConfig, out: Path) -> TrainConfig:
    """The `vlm-depth train` config of the demo: the recipe, with the demo's model, data, steps, seed and output."""
    from vlm_depth.train.train_config import TrainConfig

    mdm = {"mdm_mode": "joint"} if cfg.mdm else {}  # the head itself (width, pyramid, mixture, lr) is the recipe's
    return dataclasses.replace(
        load_config(TrainConfig, cfg.recipe),
        model=str(out / "tiny"),
        dataset=f"folder:{out / 'data' / 'train'}",
        num_images=0,
        val_dataset=f"synthetic:4?seed={cfg.seed + 2}&height={cfg.height}&width={cfg.width}",
        label_source="sparse",
        protocol=PROTOCOL,
        max_steps=cfg.train_steps,
        seed=cfg.seed,
        out=str(out / "train"),
        **mdm,
    )


def _train(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from vlm_depth.train.trainer import run_train

    summary = run_train(train_config(cfg, out))
    if not summary.get("final"):
        raise ModelError(f"demo: training in {out / 'train'} finished without a final checkpoint")
    return summary


def _evaluate(cfg: DemoConfig, out: Path, checkpoint: str) -> list[dict[str, Any]]:
    """Every baseline and the model's readouts on the held-out frames; returns the cell results (metrics.json
    dicts, plus `panels`: compare panels relative to OUT) in the order of the methods."""
    from vlm_depth.eval.eval_config import EvalConfig
    from vlm_depth.eval.runner import run_suite
    from vlm_depth.eval.suite import DatasetEntry, Suite, baseline_methods, model_method

    entry = DatasetEntry(spec=f"folder:{out / 'data' / 'heldout'}", name=DATASET_NAME, protocols=(PROTOCOL,))
    methods = baseline_methods("all") + [model_method(checkpoint, r, name=model_name(r)) for r in readouts(cfg)]
    summary = run_suite(Suite([entry], methods), EvalConfig(out=str(out / "eval"), seed=cfg.seed, panels=1))
    if summary["skipped"]:
        reasons = "; ".join(f"{s['method']}: {s['reason']}" for s in summary["skipped"])
        raise ModelError(f"demo: evaluation cells failed: {reasons}")
    cells = {}
    for path in (out / "eval").glob("*/*/*/metrics.json"):
        cell = json.loads(path.read_text())
        cell["panels"] = [str(p.relative_to(out)) for p in sorted(path.parent.glob("compare_*.png"))]
        cells[cell["method"]] = cell
    return [cells[m.name] for m in methods]


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
    prepare_out(out)
    save_config(out, cfg)
    host = machine()
    clock = StageClock(STAGES)
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
        with clock.stage("train"):
            train = _train(cfg, out)
        with clock.stage("eval"):
            results = _evaluate(cfg, out, train["final"])
        with clock.stage("complete"):
            completions = _complete(cfg, out, train["final"])
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
            "checkpoint": train["final"],
            "evaluation": str(out / "eval" / "report.md"),
            "completed": {r: s["out"] for r, s in completions.items()},
            "metrics": {
                r["method"]: {"mae": r["mae"], "rmse": r["rmse"], "fill_mae": r["fill"]["mae"]} for r in results
            },
            "verdict": verdict(results, models),
            "seconds": {**clock.seconds, "total": total},
            "cpu_seconds": dict(clock.cpu_seconds),
            "within_budget": total <= 60 * cfg.budget_minutes,
            "hardware": host["hardware"],
        }
    )
