"""The demo's report.md: a one-line verdict, metric tables, a plain verdict of each model readout against every
baseline, label-free vs GT gaps, the real-frame table, the training curve, pictures, timings and the hardware; and
the README's Results section, copied from it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_depth.demo.demo_config import PROTOCOL, DemoConfig, model_name, readouts, supervisions, train_folder
from vlm_depth.errors import ConfigError
from vlm_depth.eval import report
from vlm_depth.eval.baselines import BASELINES
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

    baselines = [r for r in results if r["method"] in BASELINES]
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


# The paper's label-free (SD) and GT-supervised Qwen2.5-VL-3B on VOID 150, ablation rows (e) and (f), in meters
# (../shared/docs/PAPER_RESULTS.md): published, not measured by this project.
PUBLISHED_LABEL_FREE_VS_GT = {"mae": (0.185, 0.176), "rmse": (0.604, 0.592)}
GAP_METRICS = (  # (comparison_rows metric, label, decimals)
    ("mae", "MAE (m)", 3),
    ("rmse", "RMSE (m)", 3),
    ("absrel", "AbsRel", 4),
    ("delta1", "δ<1.25", 4),
    ("fill_mae", "fill MAE (m)", 3),
    ("fill_rmse", "fill RMSE (m)", 3),
)
README_BEGIN = "<!-- demo results: written by `vlm-depth demo --readme README.md`; tests/test_readme_results.py -->"
README_END = "<!-- end of demo results -->"


def _fill_mae(result: Mapping[str, Any]) -> float:
    value = (result.get("fill") or {}).get("mae")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _against(own: float, fill_maes: Mapping[str, float]) -> str:
    """How the fill MAE `own` (meters) compares with the two simple fills, `nearest` and `linear`, in `fill_maes`
    (method -> fill MAE); e.g. "beats `nearest` (0.848 m) and loses to `linear` (0.787 m)"."""
    parts = []
    for name in ("nearest", "linear"):
        value = fill_maes[name]
        verb = "beats" if own < value else "ties with" if own == value else "loses to"
        parts.append(f"{verb} `{name}` ({value:.3f} m)")
    return " and ".join(parts)


def headline(results: Sequence[Mapping[str, Any]], cfg: DemoConfig) -> str:
    """One line: whether the best label-free readout beats `nearest` and `linear` on fill pixels (MAE, meters), and
    the label-free minus GT-supervised fill MAE of each readout (with `cfg.gt_labels`)."""
    by_name = {r["method"]: r for r in results}
    best = min((model_name(r) for r in readouts(cfg)), key=lambda name: _fill_mae(by_name[name]))
    own = _fill_mae(by_name[best])
    line = f"The best learned readout, `{best}` (label-free), fills the sensor's holes with MAE {own:.3f} m: "
    line += _against(own, {name: _fill_mae(r) for name, r in by_name.items()}) + "."
    if cfg.gt_labels:
        gaps = [
            (r, _fill_mae(by_name[model_name(r)]) - _fill_mae(by_name[model_name(r, "gt")])) for r in readouts(cfg)
        ]
        line += " Label-free minus GT-supervised fill MAE: " + ", ".join(f"{r} {g:+.3f} m" for r, g in gaps) + "."
    return line


def gap_section(results: Sequence[Mapping[str, Any]], cfg: DemoConfig) -> list[str]:
    """Label-free vs GT labels: per readout and metric the two values and the gap (label-free - GT), the published
    gap for reference and the caveat."""
    pairs = [(model_name(r), model_name(r, "gt")) for r in readouts(cfg)]
    rows = {(row["a"], row["metric"]): row for row in report.comparison_rows(results, pairs)}
    table = []
    for (a, _b), readout in zip(pairs, readouts(cfg)):
        for metric, label, decimals in GAP_METRICS:
            row = rows[(a, metric)]
            values = [row["value_a"], row["value_b"]]
            gap = "n/a" if row["gap"] is None else f"{row['gap']:+.{decimals}f}"
            table.append([readout, label, *(_fmt(v, decimals) for v in values), gap])
    published = ", ".join(
        f"{name.upper()} {sd:.3f} vs {gt:.3f} m ({sd - gt:+.3f} m)"
        for name, (sd, gt) in PUBLISHED_LABEL_FREE_VS_GT.items()
    )
    return [
        f"The same recipe, data, seed and {cfg.train_steps} steps, trained twice: with label-free labels (held-out "
        "sensor points) and with ground-truth labels (the ray-cast depth at pixels the sensor missed, and for the MDM "
        "head every valid ground-truth pixel), evaluated on the same held-out frames. Gap = label-free - GT (for "
        "errors, positive means label-free is worse).",
        "",
        *report.markdown_table(["readout", "metric", "label-free", "GT labels", "label-free - GT"], table),
        "",
        f"Published for reference, not measured here: the paper's Qwen2.5-VL-3B on VOID 150 (ablation rows (e) "
        f"label-free and (f) GT): {published}. A 0.67 M-parameter model trained from random weights for "
        f"{cfg.train_steps} steps is not that model; the demo shows the comparison running, not the paper's gap.",
    ]


def real_section(real: Mapping[str, Any], cfg: DemoConfig) -> list[str]:
    """Zero-shot on the real frames: fill MAE (meters) per method and dataset x protocol, and per dataset whether
    the best label-free readout beats `nearest` and `linear`; a note when the frames were absent."""
    if not real["results"]:
        return [f"Skipped: the real sample frames were not found ({real['found']})."]
    entries = real["entries"]
    by_key = {(r["dataset_name"], r["method"]): r for r in real["results"]}
    methods = list(dict.fromkeys(r["method"] for r in real["results"]))
    header = ["method", *(f"{e.name} `{e.protocols[0]}`" for e in entries)]
    best = {e.name: min(_fill_mae(by_key[(e.name, m)]) for m in methods) for e in entries}
    rows = []
    for method in methods:
        cells = [f"`{method}`"]
        for entry in entries:
            value = _fill_mae(by_key[(entry.name, method)])
            cells.append(f"**{value:.3f}**" if value == best[entry.name] else f"{value:.3f}")
        rows.append(cells)
    frames = ", ".join(f"{e.name} {by_key[(e.name, methods[0])]['n_images']}" for e in entries)
    lines = [
        "Zero-shot: the label-free models above, never trained on real data, on the real frames of "
        "`train-and-test/` (NYUv2 Kinect, KITTI LiDAR). Inputs as `eval/sample_frames.yaml` states them: "
        "`uniform:500` = 500 points sampled from the Kinect depth, the standard NYUv2 completion input; `lidar:64` = "
        "64 LiDAR lines simulated on KITTI's annotated ground truth; `density:0.5` = half of a real HDL-64 scan, the "
        "other half being the reference (no ground truth there). The query readout uses the `fast` preset (a "
        f"1024-query grid). Fill MAE in meters, best per column in bold; frames: {frames}.",
        "",
        *report.markdown_table(header, rows),
        "",
    ]
    models = [m for m in methods if m not in BASELINES]
    for entry in entries:
        name = min(models, key=lambda m: _fill_mae(by_key[(entry.name, m)]))
        own = _fill_mae(by_key[(entry.name, name)])
        against = _against(own, {m: _fill_mae(by_key[(entry.name, m)]) for m in methods})
        lines.append(f"- {entry.name}: the best learned readout, `{name}` ({own:.3f} m), {against}.")
    return lines


def results_section(report_text: str) -> str:
    """The `## Results` section of a demo report.md (heading excluded), as the README carries it."""
    if "\n## Results\n" not in report_text:
        raise ConfigError("not a demo report: no `## Results` section")
    return report_text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0].strip("\n")


def readme_block(readme_text: str, where: str = "README") -> str:
    """The text between the README's demo-results markers."""
    if readme_text.count(README_BEGIN) != 1 or readme_text.count(README_END) != 1:
        raise ConfigError(f"{where}: expected one `{README_BEGIN}` line and one `{README_END}` line")
    return readme_text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


def update_readme(readme: Path, report_md: Path) -> Path:
    """Replace the README's demo-results block with the Results section of the demo report `report_md`."""
    text = readme.read_text(encoding="utf-8")
    readme_block(text, str(readme))  # both markers, once each
    section = results_section(report_md.read_text(encoding="utf-8"))
    head, _, rest = text.partition(README_BEGIN)
    tail = rest.partition(README_END)[2]
    return atomic_write(readme, f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")


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
    real: Mapping[str, Any],
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
    """report.md of a demo run (see the module docstring); links are relative to the report's folder. `train`:
    `run_train`'s summary per supervision (`sparse`, `gt`); `real`: `found` (where the real frames were looked for),
    `entries` and `results` of the real-frame evaluation. `host` is `machine()` at the start plus `load_end` and
    `threads_end` (its load average and threads at the end). The Results section holds only what the seeds fix
    (no times, paths or links): the README carries it verbatim."""
    out = path.parent
    models = [model_name(r) for r in readouts(cfg)]
    heldout = data["heldout"]
    within = total <= 60 * cfg.budget_minutes
    load = host["load_average"]
    threads = f"{host['threads']} threads"
    if host["threads_end"] != host["threads"]:
        threads = f"{host['threads']} threads at the start, {host['threads_end']} from the recipe's `num_threads` on"
    load_text = f"; load average (1 min) {load[0]} at the start, {host['load_end'][0]} at the end" if load else ""
    trained = " and once with ground-truth labels (`train-gt/`)" if cfg.gt_labels else ""
    real_text = (
        f"; zero-shot evaluation of the label-free readouts on the real frames found at {real['found']}"
        if real["results"]
        else f"; no real-frame evaluation ({real['found']})"
    )
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
        f"pixels with ground truth); training for {cfg.train_steps} steps with the recipe "
        f"`{_recipe_name(cfg.recipe)}`, label-free (labels: held-out sensor points, never the ground truth){trained}; "
        f"evaluation of the readouts ({', '.join(f'`{m}`' for m in models)}) and every classical baseline on the "
        f"held-out frames under the `{PROTOCOL}` protocol (input: the simulated sensor depth; reference: the "
        f"ray-cast ground truth){real_text}.",
        "",
        "## Results",
        "",
        f"**{headline(results, cfg)}**",
        "",
        "### Held-out synthetic frames",
        "",
        f"`{PROTOCOL}` protocol. MAE and RMSE in meters, iMAE and iRMSE in 1/km, per image then averaged over the "
        f"{cfg.num_eval} images; **fill** = pixels where the sensor gave no depth (the completion), **keep** = pixels "
        "where it did (every method returns the input there, so keep errors are the sensor's own error against the "
        "ground truth). Best value per column in bold.",
        "",
        *report.metric_table(results, report.TABLE_COLUMNS),
        "",
        *report.metric_table(results, report.FILL_KEEP_COLUMNS, count_region="fill"),
        "",
        "Verdict of the label-free readouts:",
        "",
        *[f"- {line}" for line in verdict(results, models)],
        "",
        f"Either way this is not a measure of the method: the model is a "
        f"{tiny['parameters'] / 1e6:.2f} M-parameter network with random initial weights, trained for "
        f"{cfg.train_steps} steps on {cfg.num_train} frames on a CPU, while the classical baselines need no "
        "training. The demo shows that the pipeline runs end to end (synthetic sensor data, label-free training, "
        "pixel-query decoding, dense assembly with keep pixels preserved, metrics); the method's numbers come from "
        "a pretrained Qwen2.5-VL-3B trained with the recipes in `train/` (README, Benchmarks).",
    ]
    if cfg.gt_labels:
        lines += ["", "### Label-free vs ground-truth labels", "", *gap_section(results, cfg)]
    lines += ["", "### Real frames, zero-shot", "", *real_section(real, cfg)]
    lines += ["", "## Training", ""]
    for supervision in supervisions(cfg):
        summary = train[supervision]
        val = summary.get("validation") or {}
        kind = "Label-free" if supervision == "sparse" else "Ground-truth labels"
        lines += [
            f"{kind} (`{train_folder(supervision)}/`), {summary['steps'][1]} steps in {summary['seconds']:.0f} s: "
            f"training loss (cross-entropy over the answer tokens + numeric L1{' + MDM loss' if cfg.mdm else ''}, "
            f"weighted as the recipe says) {_fmt(summary.get('loss_first'))} -> {_fmt(summary.get('loss_last'))}, "
            f"teacher-forced numeric MAE {_fmt(summary.get('mae_first'))} -> {_fmt(summary.get('mae_last'))} m "
            "(means over the first and the last steps, as `vlm-depth train` reports them)"
            + (
                f"; validation on frames of a third seed: greedy MAE {_fmt(val.get('val_mae'))} m over "
                f"{val.get('val_queries')} queries, {100 * val.get('val_parsed', 0):.0f} % of the answers parseable"
                if val
                else ""
            )
            + ".",
            "",
        ]
    if curve:
        lines += [f"Label-free training curve: ![training curve]({_link(curve, out)})"]
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
    best = min((r for r in results if r["method"] in BASELINES), key=_fill_mae)
    for result in [*(r for r in results if r["method"] not in BASELINES), best]:
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
        *[
            f"- checkpoint ({'label-free' if s == 'sparse' else 'GT labels'}): `{_link(train[s]['final'], out)}` "
            "(load with `DepthVLM.from_pretrained`)"
            for s in supervisions(cfg)
        ],
        "- evaluation: `eval/report.md`, `eval/results.csv`, per method `eval/*/*/METHOD/metrics.json`"
        + ("; real frames: `real/report.md`" if real["results"] else ""),
        "- data: `data/train`, `data/heldout` (folder format); training log: `train/log.jsonl`",
        "- resolved config: `config.yaml`",
    ]
    return atomic_write(path, "\n".join(lines) + "\n")


def _fmt(value: Any, decimals: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _timing_rows(seconds: Mapping[str, float], cpu: Mapping[str, float], total: float) -> list[list[str]]:
    rows = [[name, f"{s:.1f}", f"{cpu[name]:.1f}"] for name, s in seconds.items()]
    return rows + [["total", f"{total:.1f}", f"{sum(cpu.values()):.1f}"]]
