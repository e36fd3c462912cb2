"""`vlm-depth demo`: the main job on the embedded default, end to end on a CPU in minutes.

Every stage is one library call, the same code path as the command of the same name, and is timed:

1. `tiny`      the offline tiny Qwen2.5-VL (`build_tiny_checkpoint`)                                -> OUT/tiny
2. `data`      synthetic frames with simulated stereo-sensor failures (`run_synth`): a training set, and a
               held-out set from another seed, in the folder format                      -> OUT/data/{train,heldout}
3. `train`     label-free training with a recipe of top-level `train/` (`run_train`): the labels are held-out
               sensor points, never the ground truth; with `mdm`, the MDM head trains jointly   -> OUT/train/final
4. `eval`      every classical baseline and the model's readout(s) on the held-out frames under the `sensor`
               protocol: the input is the simulated sensor depth, the reference the ray-cast ground truth
               (`run_suite`)                                                                     -> OUT/eval
5. `complete`  the first held-out frame through `run_complete` (all of its outputs), per readout -> OUT/complete
6. `report`    OUT/report.md: metric tables (all, fill and keep pixels), a plain verdict of the model against
               every baseline, the training curve, pictures, timings and the hardware.

The model is tiny and starts from random weights, so it is expected to lose to the classical baselines; the report
says so in plain words whenever it does. The demo shows that the pipeline works end to end, not what the method
achieves with a pretrained Qwen2.5-VL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_depth.config import DemoConfig, SynthConfig, TinyConfig, parse_config, save_config
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.eval import report
from vlm_depth.resources import REPO_ROOT, load_yaml, resource_path

logger = logging.getLogger(__name__)

STAGES = ("tiny", "data", "train", "eval", "complete", "report")
STAGE_DIRS = ("tiny", "data", "train", "eval", "complete")
DATASET_NAME = "synthetic-heldout"
PROTOCOL = "sensor"


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


def readouts(cfg: DemoConfig) -> list[str]:
    """The model readouts the demo trains and evaluates: `query`, plus `mdm` with `cfg.mdm`."""
    return ["query", "mdm"] if cfg.mdm else ["query"]


def model_name(readout: str) -> str:
    """Method name of the demo model with `readout` in the tables."""
    return f"tiny-vlm-{readout}"


def train_argv(cfg: DemoConfig, out: Path) -> list[str]:
    """`vlm-depth train` arguments of the demo: the recipe, then the demo's model, data, steps, seed and output."""
    val = f"synthetic:4?seed={cfg.seed + 2}&height={cfg.height}&width={cfg.width}"
    argv = ["--config", str(resource_path("train", cfg.recipe))]
    argv += ["--model", str(out / "tiny"), "--dataset", f"folder:{out / 'data' / 'train'}", "--num_images", "0"]
    argv += ["--val_dataset", val, "--label_source", "sparse", "--protocol", PROTOCOL]
    argv += ["--max_steps", str(cfg.train_steps), "--seed", str(cfg.seed), "--out", str(out / "train")]
    if cfg.mdm:
        # A narrow head: at the tiny recipe's branch learning rate (1e-2) the default 256-channel head overshoots
        # to the 10 km clamp within a few steps, where its gradient vanishes; 32 channels train stably and faster.
        argv += ["--mdm_mode", "joint", "--mdm_width", "32", "--mdm_levels", "2"]
    return argv


def _train(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from vlm_depth.train.config import TrainConfig
    from vlm_depth.train.loop import run_train

    train_cfg = parse_config(TrainConfig, train_argv(cfg, out), prog="vlm-depth train")
    summary = run_train(train_cfg)
    if not summary.get("final"):
        raise ModelError(f"demo: training in {out / 'train'} finished without a final checkpoint")
    return summary


def _evaluate(cfg: DemoConfig, out: Path, checkpoint: str) -> list[dict[str, Any]]:
    """Every baseline and the model's readouts on the held-out frames; returns the cell results (metrics.json
    dicts, plus `panels`: compare panels relative to OUT) in the order of the methods."""
    from vlm_depth.eval.config import EvalConfig
    from vlm_depth.eval.runner import DatasetEntry, Suite, baseline_methods, model_method, run_suite

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
    from vlm_depth.infer.complete import run_complete
    from vlm_depth.infer.config import CompleteConfig

    heldout = f"folder:{out / 'data' / 'heldout'}"
    summaries = {}
    for readout in readouts(cfg):
        target = out / "complete" / readout
        complete_cfg = CompleteConfig(model=checkpoint, dataset=heldout, limit=1, out=str(target), readout=readout)
        summaries[readout] = run_complete(complete_cfg)
    return summaries


def verdict(results: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[str]:
    """Plain sentences: for each model method, the baselines it loses to, ties with and beats on MAE (meters, lower
    is better) over all evaluated pixels and over fill pixels; a NaN/None value is named as missing, never counted
    as a win or a loss."""

    def mae(result: Mapping[str, Any], region: str | None) -> float | None:
        value = (result.get(region) or {}) if region else result
        value = value.get("mae")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def listing(parts: Sequence[str]) -> str:
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    baselines = [r for r in results if r["method"] not in models]
    lines = []
    for name in models:
        model = next(r for r in results if r["method"] == name)
        for region, where in ((None, "all evaluated pixels"), ("fill", "fill pixels (where the sensor failed)")):
            own = mae(model, region)
            if own is None:
                lines.append(f"`{name}` has no finite MAE over {where}.")
                continue
            scored = [(b["method"], mae(b, region)) for b in baselines]
            clauses = []
            for verb, keep in (("loses to", float.__lt__), ("ties with", float.__eq__), ("beats", float.__gt__)):
                hits = [f"`{n}` ({v:.3f} m)" for n, v in scored if v is not None and keep(v, own)]
                if hits:
                    every = " every baseline:" if len(hits) == len(baselines) else ""
                    clauses.append(f"{verb}{every} {listing(hits)}")
            missing = [f"`{n}`" for n, v in scored if v is None]
            if missing:
                clauses.append(f"cannot be compared with {listing(missing)} (no finite MAE)")
            lines.append(f"On MAE over {where}, `{name}` ({own:.3f} m) {'; '.join(clauses)}.")
    return lines


def plot_training_curve(log_path: Path, path: Path) -> Path | None:
    """Training cross-entropy and teacher-forced numeric MAE (m, with a 10-step running mean) per step from a
    `vlm-depth train` log.jsonl, with the validation rows' greedy MAE as points; None without training rows."""
    import numpy as np

    from vlm_depth.eval.report import pyplot, save_figure

    plt = pyplot()
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    val = [r for r in rows if r.get("split") == "val" and r.get("val_mae") is not None]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (ax_loss, ax_mae) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["ce"] for r in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="answer-token cross-entropy", yscale="log")
    mae = np.array([r["mae"] for r in train], dtype=np.float64)
    window = min(10, len(mae))
    running = np.convolve(mae, np.ones(window) / window, mode="valid")
    ax_mae.plot(steps, mae, lw=0.7, alpha=0.4, label="train (teacher-forced expectation)")
    ax_mae.plot(steps[window - 1 :], running, lw=1.5, label=f"train, {window}-step running mean")
    if val:
        label = "validation (greedy answers vs ground truth)"
        ax_mae.plot([r["step"] for r in val], [r["val_mae"] for r in val], "o", label=label)
    ax_mae.set(xlabel="step", ylabel="numeric MAE (m)", title="label-free training: numeric error")
    ax_mae.legend(fontsize=8)
    for ax in (ax_loss, ax_mae):
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, dpi=90)


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


def _recipe_name(recipe: str) -> str:
    """The recipe as a user would pass it: relative to the repository when it is one of top-level `train/`."""
    path = resource_path("train", recipe).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _command(cfg: DemoConfig) -> str:
    defaults = DemoConfig()
    changed = [f"--{k} {v}" for k, v in vars(cfg).items() if v != getattr(defaults, k) or k == "out"]
    return " ".join(["vlm-depth demo", *changed])


def _link(path: str | Path, out: Path) -> str:
    return str(Path(path).resolve().relative_to(out.resolve()))


def write_report(
    path: Path,
    cfg: DemoConfig,
    *,
    results: Sequence[Mapping[str, Any]],
    tiny: Mapping[str, Any],
    data: Mapping[str, Mapping[str, Any]],
    train: Mapping[str, Any],
    completions: Mapping[str, Mapping[str, Any]],
    seconds: Mapping[str, float],
    cpu: Mapping[str, float],
    total: float,
    host: Mapping[str, Any],
    curve: Path | None,
) -> Path:
    """report.md of a demo run (see the module docstring); links are relative to the report's folder. `host` is
    `machine()` at the start plus `load_end` and `threads_end` (its load average and threads at the end)."""
    out = path.parent
    models = [model_name(r) for r in readouts(cfg)]
    heldout = data["heldout"]
    within = total <= 60 * cfg.budget_minutes
    load = host["load_average"]
    threads = f"{host['threads']} threads"
    if host["threads_end"] != host["threads"]:
        threads = f"{host['threads']} threads at the start, {host['threads_end']} from the recipe's `num_threads` on"
    load_text = f"; load average (1 min) {load[0]} at the start, {host['load_end'][0]} at the end" if load else ""
    val = train.get("validation") or {}
    lines = [
        "# vlm-depth demo",
        "",
        f"Command: `{_command(cfg)}`  ",
        f"Hardware: {host['hardware']} (torch {host['torch']}, {threads}{load_text}).  ",
        f"Total time: {_minutes(total)} ({'within' if within else '**over**'} the {cfg.budget_minutes:g}-minute "
        "budget).",
        "",
        "What ran: the offline tiny Qwen2.5-VL "
        f"({tiny['parameters'] / 1e6:.2f} M parameters, random initial weights) with a fresh zero-initialised depth "
        f"branch{' and MDM head' if cfg.mdm else ''}; {cfg.num_train} synthetic training frames and {cfg.num_eval} "
        f"held-out frames (another seed) of {cfg.width}x{cfg.height} pixels with simulated stereo-sensor failures "
        f"(held-out sensor depth missing on {100 * heldout['missing_rate']['overall']:.1f} % of the "
        f"pixels with ground truth); label-free training for {cfg.train_steps} steps with the recipe "
        f"`{_recipe_name(cfg.recipe)}` (labels: held-out sensor points, never the ground truth); evaluation of the "
        f"model's readout{'s' if len(models) > 1 else ''} ({', '.join(f'`{m}`' for m in models)}) and every classical "
        f"baseline on the held-out frames under the `{PROTOCOL}` protocol (input: the simulated sensor depth; "
        "reference: the ray-cast ground truth).",
        "",
        "## Results",
        "",
        f"Held-out synthetic frames, `{PROTOCOL}` protocol. MAE and RMSE in meters, iMAE and iRMSE in 1/km, per image "
        "then averaged over images; **fill** = pixels where the sensor gave no depth (the completion), **keep** = "
        "pixels where it did (every method returns the input there, so keep errors are the sensor's own error "
        "against the ground truth). Best value per column in bold.",
        "",
        *report.metric_table(results, report.TABLE_COLUMNS),
        "",
        *report.metric_table(results, report.FILL_KEEP_COLUMNS, count_region="fill"),
        "",
        "Verdict:",
        "",
        *[f"- **{line}**" for line in verdict(results, models)],
        "",
        f"This is expected and is not a measure of the method: the model is a "
        f"{tiny['parameters'] / 1e6:.2f} M-parameter network with random initial weights, trained for "
        f"{cfg.train_steps} steps on {cfg.num_train} frames on a CPU, while the classical baselines need no "
        "training. The demo shows that the pipeline runs end to end (synthetic sensor data, label-free training, "
        "pixel-query decoding, dense assembly with keep pixels preserved, metrics); the method's numbers come from "
        "a pretrained Qwen2.5-VL-3B trained with the recipes in `train/` (README, Benchmarks).",
        "",
        "## Training",
        "",
        f"Label-free, {train['steps'][1]} steps in {train['seconds']:.0f} s: training loss (cross-entropy over the "
        f"answer tokens + numeric L1{' + MDM loss' if cfg.mdm else ''}, weighted as the recipe says) "
        f"{_fmt(train.get('loss_first'))} -> {_fmt(train.get('loss_last'))}, teacher-forced numeric MAE "
        f"{_fmt(train.get('mae_first'))} -> {_fmt(train.get('mae_last'))} m (means over the first and the last "
        "steps, as `vlm-depth train` reports them)"
        + (
            f"; validation on frames of a third seed: greedy MAE {_fmt(val.get('val_mae'))} m over "
            f"{val.get('val_queries')} queries, {100 * val.get('val_parsed', 0):.0f} % of the answers parseable"
            if val
            else ""
        )
        + ".",
    ]
    if curve:
        lines += ["", f"![training curve]({_link(curve, out)})"]
    lines += ["", "## Pictures", ""]
    if heldout.get("preview"):
        lines += [
            f"Held-out frame (RGB | GT | sensor | sensor error | material): ![data]({_link(heldout['preview'], out)})",
            "",
        ]
    for readout, summary in completions.items():
        image = summary["per_image"][0]
        files = image["files"]
        compare = files.get("compare")
        if compare:
            lines += [f"`vlm-depth complete` with the `{readout}` readout on `{image['name']}`:", ""]
            lines += [f"![complete {readout}]({_link(compare, out)})", ""]
        others = ", ".join(f"[{kind}]({_link(p, out)})" for kind, p in files.items() if kind != "compare")
        lines += [f"Its other outputs: {others}.", ""]
    best = min((r for r in results if r["method"] not in models), key=lambda r: _sort_key(r["fill"].get("mae")))
    for result in [*(r for r in results if r["method"] in models), best]:
        role = "best baseline on fill MAE" if result is best else "model"
        for panel in result.get("panels", []):
            lines += [f"Evaluation panel of `{result['method']}` ({role}): ![{result['method']}]({panel})", ""]
    panels = [(r["method"], p) for r in results for p in r.get("panels", [])]
    lines += [
        "All evaluation panels (RGB | input | prediction | error): " + ", ".join(f"[{m}]({p})" for m, p in panels)
    ]
    lines += ["", "## Timings", ""]
    lines += report.markdown_table(
        ["stage", "wall-clock s", "CPU s (this process)"], _timing_rows(seconds, cpu, total)
    )
    lines += [
        "",
        "CPU seconds count every thread of the demo's process (not the data stage's generator processes); on a "
        "machine shared with other jobs the wall clock exceeds them.",
    ]
    lines += [
        "",
        "## Files",
        "",
        f"- checkpoint: `{_link(train['final'], out)}` (load with `DepthVLM.from_pretrained`)",
        "- evaluation: `eval/report.md`, `eval/results.csv`, per method `eval/*/*/METHOD/metrics.json`",
        "- data: `data/train`, `data/heldout` (folder format); training log: `train/log.jsonl`",
        "- resolved config: `config.yaml`",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _sort_key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _timing_rows(seconds: Mapping[str, float], cpu: Mapping[str, float], total: float) -> list[list[str]]:
    rows = [[name, f"{s:.1f}", f"{cpu[name]:.1f}"] for name, s in seconds.items()]
    return rows + [["total", f"{total:.1f}", f"{sum(cpu.values()):.1f}"]]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """`vlm-depth demo`: run the stages of the module docstring into `cfg.out`; returns where everything is, the
    headline metrics per method, the verdict and the timings."""
    from vlm_depth.data.synthetic import run_synth
    from vlm_depth.model.tiny import build_tiny_checkpoint

    _check(cfg)
    out = Path(cfg.out)
    prepare_out(out)
    save_config(out, cfg)
    host = machine()
    clock = StageClock(STAGES)
    try:
        with clock.stage("tiny"):
            tiny = build_tiny_checkpoint(TinyConfig(out=str(out / "tiny"), seed=cfg.seed))
        with clock.stage("data"):
            size = {"height": cfg.height, "width": cfg.width}
            data = {
                "train": run_synth(
                    SynthConfig(out=str(out / "data" / "train"), num=cfg.num_train, seed=cfg.seed, **size)
                ),
                "heldout": run_synth(
                    SynthConfig(
                        out=str(out / "data" / "heldout"), num=cfg.num_eval, seed=cfg.seed + 1, preview=True, **size
                    )
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
        logger.warning("demo took %s, over its %g-minute budget", _minutes(total), cfg.budget_minutes)
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
