"""The demo's report.md: metric tables, a plain verdict of each model readout against every baseline, the training
curve, pictures, timings and the hardware."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_depth.demo.demo_config import PROTOCOL, DemoConfig, model_name, readouts
from vlm_depth.eval import report
from vlm_depth.files import atomic_write
from vlm_depth.resources import resource_dir, resource_path


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


def _recipe_name(recipe: str) -> str:
    """The recipe as a user would pass it: `train/NAME.yaml` when it is a shipped recipe, else its path."""
    path = resource_path("train", recipe).resolve()
    return f"train/{path.name}" if path.parent == resource_dir("train").resolve() else str(path)


def minutes(seconds: float) -> str:
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
        f"Total time: {minutes(total)} ({'within' if within else '**over**'} the {cfg.budget_minutes:g}-minute "
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
        f"Either way this is not a measure of the method: the model is a "
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
    return atomic_write(path, "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _sort_key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _timing_rows(seconds: Mapping[str, float], cpu: Mapping[str, float], total: float) -> list[list[str]]:
    rows = [[name, f"{s:.1f}", f"{cpu[name]:.1f}"] for name, s in seconds.items()]
    return rows + [["total", f"{total:.1f}", f"{sum(cpu.values()):.1f}"]]
