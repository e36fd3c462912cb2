"""`vlm-depth eval`: run completion methods over datasets x sparsity protocols and write metrics, CSVs and reports.

For every image the sparse input comes from `vlm_depth.data.sparsify.sparse_input(protocol, ...)` with the seed
`image_seed(seed, image index)`, so every method sees exactly the same input. The reference is the sample's
ground truth; a sample without one is evaluated against its own sensor depth, sparsified by the protocol (the
report says so). Methods are classical baselines (`vlm_depth.eval.baselines`) or vlm-depth checkpoints through
`vlm_depth.infer.complete.make_predictor(path, readout=...)` -> `(rgb, sparse) -> (depth, uncertainty)`.

Output layout under `out`:
    config.yaml, suite.yaml          the resolved command config and suite
    report.md, results.csv           all cells; mae_vs_density.png when a dataset has two or more input densities
    DATASET/PROTOCOL/METHOD/         metrics.json, per_image.csv, compare_NN.png
Every option, dataset kind, protocol and checkpoint is checked before `out` is claimed (locked; refused when it
holds an earlier evaluation unless `--overwrite`). A suite of several datasets skips a failing cell with a warning;
with one dataset the failure is the answer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from tqdm.auto import tqdm

from vlm_depth.config import save_config
from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError, ModelError
from vlm_depth.eval import report
from vlm_depth.eval.baselines import get_baseline
from vlm_depth.eval.eval_config import EvalConfig, reader_options
from vlm_depth.eval.metrics import REGIONS, eval_mask, mean_over_images, parse_crop, region_metrics
from vlm_depth.eval.suite import (
    DatasetEntry,
    Method,
    Suite,
    baseline_methods,
    check_names,
    dataset_name,
    load_suite,
    model_method,
    split_list,
)
from vlm_depth.files import atomic_write, claim_output
from vlm_depth.model.checkpoint import locate_checkpoint

logger = logging.getLogger(__name__)

# What marks a folder as holding an evaluation (config.yaml is written first).
MARKERS = ("config.yaml", "suite.yaml", "results.csv", "report.md")

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Prepared:
    """One image ready for every method: rgb (H, W, 3) uint8, sparse input and reference (H, W) meters, masks."""

    index: int
    name: str
    rgb: np.ndarray
    sparse: np.ndarray
    reference: np.ndarray
    masks: dict[str, np.ndarray]
    gt_source: str
    min_depth: float | None
    max_depth: float | None
    crop: tuple[int, int, int, int] | None
    grid_note: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def suite_from_config(cfg: EvalConfig) -> Suite:
    """The suite of a single command-line run: one dataset, its protocol list, and the given methods."""
    if not cfg.dataset:
        raise ConfigError("give --dataset KIND:PATH (and --protocol, --model or --baseline) or --suite FILE.yaml")
    if bool(cfg.model) == bool(cfg.baseline):
        raise ConfigError("give exactly one of --model CKPT or --baseline NAME[,NAME...|all]")
    methods = [model_method(cfg.model, cfg.readout)] if cfg.model else baseline_methods(cfg.baseline)
    protocols = tuple(split_list(cfg.protocol))
    if not protocols:
        raise ConfigError("--protocol is empty")
    options = reader_options(cfg.options)
    name = dataset_name(cfg.dataset)
    entry = DatasetEntry(cfg.dataset, name, protocols, cfg.split, cfg.max_depth, cfg.crop, options=options)
    return Suite([entry], methods)


def _model_predictor(method: Method, base_model: str) -> Predictor:
    """The checkpoint's `(rgb, sparse) -> depth` (the uncertainty the predictor also returns is not evaluated)."""
    from vlm_depth.infer.complete import make_predictor
    from vlm_depth.infer.complete_config import preset_settings

    settings = preset_settings(method.preset) if method.preset else None
    predict = make_predictor(method.model, readout=method.readout, settings=settings, base_model=base_model)

    def depth_only(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        depth, _uncertainty = predict(rgb, sparse)
        return np.asarray(depth)

    return depth_only


def _check_suite(suite: Suite, crop_override: str) -> None:
    """Fail before any work on a malformed protocol or dataset kind, or a missing checkpoint; a suite of one
    dataset also opens it (its errors are the run's answer, see `run_suite`)."""
    from vlm_depth.data import load, parse_spec
    from vlm_depth.data.sparsify import parse_protocol

    for entry in suite.datasets:
        parse_spec(entry.spec)
        if len(suite.datasets) == 1:
            load(entry.spec, split=entry.split or None, **entry.options)
        for protocol in entry.protocols:
            parse_protocol(protocol)
        for crop in (entry.crop, crop_override):
            try:
                parse_crop(None if crop == "dataset" else crop)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
    for method in suite.methods:
        if method.model:
            locate_checkpoint(method.model)


def _on_one_grid(sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Any, str]:
    """(rgb, depth, gt, intrinsics, note) on one pixel grid: the depth grid when it is the RGB field of view at
    another size (the RGB is area-resized, since the reference lives on the depth grid), else the RGB grid."""
    if sample.depth_matches_rgb and sample.meta.get("depth_intrinsics") is None:
        return sample.rgb, sample.depth, sample.gt, sample.intrinsics, ""
    if sample.meta.get("depth_intrinsics") is None:
        h, w = sample.depth.shape
        rgb = cv2.resize(sample.rgb, (w, h), interpolation=cv2.INTER_AREA)
        note = f"Evaluated on the {w}x{h} depth grid (RGB {sample.width}x{sample.height} resized to it)."
        return rgb, sample.depth, sample.gt, sample.depth_intrinsics(), note
    depth, gt = sample.on_rgb_grid()
    note = "Depth mapped to the RGB grid by nearest lookup through its own intrinsics."
    return sample.rgb, depth, gt, sample.intrinsics, note


def _resolve_crop(crop: str, sample, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    if crop == "dataset":
        bounds = sample.meta.get("eval_crop")
        if bounds is not None and shape != sample.rgb.shape[:2]:
            raise DataError(
                f"{sample.name}: the dataset's eval_crop is on the {sample.width}x{sample.height} RGB grid but "
                f"evaluation runs on the {shape[1]}x{shape[0]} depth grid; pass --crop none or explicit bounds"
            )
        return None if bounds is None else tuple(bounds)
    return parse_crop(crop)


def prepare(sample, index: int, protocol: str, entry: DatasetEntry, cfg: EvalConfig) -> Prepared | None:
    """Sparse input, reference and fill/keep masks of one sample under `protocol`; None when the protocol leaves
    no valid input pixel (the image is then skipped for every method)."""
    from vlm_depth.data.sparsify import image_seed, parse_protocol, sparse_input

    rgb, depth, gt, intrinsics, grid_note = _on_one_grid(sample)
    depth_is_gt = gt is not None and gt is depth
    is_sensor = parse_protocol(protocol).kind == "sensor"
    if (gt is None or depth_is_gt) and is_sensor:
        raise ConfigError(
            f"protocol `sensor` on {entry.spec}: sample {sample.name!r} has no separate ground truth, so the input "
            "would also be the reference; use a sparsifying protocol (e.g. uniform:500) to hold sensor pixels out"
        )
    reference = depth if gt is None else gt
    sparse = sparse_input(protocol, rgb, depth, gt, intrinsics, image_seed(cfg.seed, index))
    if not valid_mask(sparse).any():
        logger.warning("%s: protocol %s leaves no valid input pixel; image skipped", sample.name, protocol)
        return None
    min_depth = sample.meta.get("min_depth") or None
    max_depth = cfg.max_depth or entry.max_depth or sample.meta.get("max_depth") or None
    crop = _resolve_crop(cfg.crop if cfg.crop != "dataset" else entry.crop, sample, reference.shape)
    try:
        masks = eval_mask(reference, sparse, min_depth=min_depth, max_depth=max_depth, crop=crop)
    except ValueError as exc:
        raise DataError(f"{entry.spec} {sample.name}: {exc}") from exc
    source = "sensor" if gt is None else "gt"
    return Prepared(index, sample.name, rgb, sparse, reference, masks, source, min_depth, max_depth, crop, grid_note)


def _iter_dataset(entry: DatasetEntry, cfg: EvalConfig) -> Iterator[tuple[int, Any]]:
    from vlm_depth.data import load

    dataset = load(entry.spec, split=entry.split or cfg.split or None, **entry.options)
    limit = cfg.max_images or entry.max_images or len(dataset)
    for index in range(min(limit, len(dataset))):
        yield index, dataset[index]


def _predict(predictor: Predictor, method: Method, item: Prepared) -> np.ndarray:
    try:
        pred = np.asarray(predictor(item.rgb, item.sparse), dtype=np.float32)
    except DataError as exc:
        raise DataError(f"{item.name}: {exc}") from exc
    if pred.shape != item.sparse.shape:
        raise ModelError(f"{method.name} returned depth {pred.shape} for {item.name}, expected {item.sparse.shape}")
    holes = item.masks["all"] & ~valid_mask(pred)
    if holes.any():
        raise ModelError(
            f"{method.name} left {int(holes.sum())} evaluated pixels of {item.name} without a depth (0 or "
            "non-finite); a completion method must return a dense map"
        )
    return pred


def evaluate_cell(
    predictor: Predictor, method: Method, entry: DatasetEntry, protocol: str, cfg: EvalConfig, cell_dir: Path
) -> dict[str, Any]:
    """Run one method on one dataset under one protocol; writes metrics.json, per_image.csv and compare panels
    into `cell_dir` and returns the cell result (the metrics.json dict)."""
    rows, per_region, panels = [], {region: [] for region in REGIONS}, []
    densities, sources, n_no_input, seconds, settings = [], {"gt": 0, "sensor": 0}, 0, [], {}
    images = _iter_dataset(entry, cfg)
    for index, sample in tqdm(images, desc=f"{method.name} | {entry.name} | {protocol}", unit="img", leave=False):
        item = prepare(sample, index, protocol, entry, cfg)
        if item is None:
            n_no_input += 1
            continue
        for key in ("min_depth", "max_depth", "crop", "grid_note"):
            settings.setdefault(key, set()).add(getattr(item, key))
        start = time.perf_counter()
        pred = _predict(predictor, method, item)
        seconds.append(time.perf_counter() - start)
        metrics = region_metrics(pred, item.reference, item.masks)
        for region in REGIONS:
            per_region[region].append(metrics[region])
        density = float(valid_mask(item.sparse).mean())
        densities.append(density)
        sources[item.gt_source] += 1
        row = {"index": index, "name": item.name, "reference": item.gt_source, "input_density": density}
        row["seconds"] = seconds[-1]
        for region in REGIONS:
            row.update({(k if region == "all" else f"{region}_{k}"): v for k, v in metrics[region].items()})
            row[f"{region}_pixels"] = int(item.masks[region].sum())
        rows.append(row)
        if len(panels) < cfg.panels:
            path = cell_dir / f"compare_{len(panels):02d}.png"
            title = f"{method.name} | {entry.name} | {protocol} | {item.name} | MAE {metrics['all']['mae']:.3f} m"
            report.save_compare_panel(path, item.rgb, item.sparse, pred, item.reference, item.masks["all"], title)
            panels.append(path)
    if not rows:
        raise DataError(f"{entry.spec}: no image with a valid input under protocol {protocol}")
    result: dict[str, Any] = {"dataset": entry.spec, "protocol": protocol, "method": method.name}
    result.update(mean_over_images(per_region["all"]))
    for region in ("fill", "keep"):
        result[region] = mean_over_images(per_region[region])
    result.update(
        dataset_name=entry.name,
        split=entry.split or cfg.split,
        gt_source=sources,
        input_density=float(np.mean(densities)),
        seconds_per_image=float(np.mean(seconds)),
        n_no_input=n_no_input,
        min_depth=_one_or_all(settings["min_depth"]),
        max_depth=_one_or_all(settings["max_depth"]),
        crop=_one_or_all(settings["crop"]),
        seed=cfg.seed,
        grid_note=" ".join(sorted(note for note in settings["grid_note"] if note)),
        model=method.model or None,
        readout=method.readout if method.model else None,
    )
    report.write_json(cell_dir / "metrics.json", result)
    report.write_csv(cell_dir / "per_image.csv", rows)
    result["panels"] = [str(p) for p in panels]
    return result


def _one_or_all(values: set) -> Any:
    """A per-image setting for the cell summary: the value if all images share it, else the sorted distinct values."""
    return next(iter(values)) if len(values) == 1 else sorted(values, key=str)


def _command(cfg: EvalConfig) -> str:
    defaults = EvalConfig()
    parts = ["vlm-depth eval"]
    for key, value in asdict(cfg).items():
        if value != getattr(defaults, key) or key == "out":
            parts.append(f"--{key} {value}")
    return " ".join(parts)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """`vlm-depth eval`: the single run or `cfg.suite` of `cfg`, through `run_suite`."""
    if cfg.suite and (cfg.dataset or cfg.model or cfg.baseline):
        raise ConfigError("--suite replaces --dataset/--model/--baseline; give either a suite or a single run")
    return run_suite(load_suite(cfg.suite) if cfg.suite else suite_from_config(cfg), cfg)


def run_suite(suite: Suite, cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every method of `suite` on every dataset x protocol and write the outputs under `cfg.out`; `cfg`
    also gives the seed, the image limit, depth-cap/crop overrides and the number of panels. Returns a summary
    (output paths, headline metrics per cell, skipped cells with reasons, per-metric gaps of `suite.compare`)."""
    check_names(suite, cfg.suite or "command line")
    _check_suite(suite, cfg.crop)
    with claim_output(cfg.out, "eval", MARKERS, overwrite=cfg.overwrite) as out:
        save_config(out, cfg)
        return _run_suite(suite, cfg, out)


def _run_suite(suite: Suite, cfg: EvalConfig, out: Path) -> dict[str, Any]:
    suite_yaml = {
        "methods": [asdict(m) for m in suite.methods],
        "datasets": [{**asdict(d), "protocols": list(d.protocols)} for d in suite.datasets],
        "compare": [list(p) for p in suite.compare],
    }
    atomic_write(out / "suite.yaml", yaml.safe_dump(suite_yaml, sort_keys=False))
    results, skipped = [], []
    for method in suite.methods:
        predictor = get_baseline(method.baseline) if method.baseline else _model_predictor(method, cfg.base_model)
        for entry in suite.datasets:
            for protocol in entry.protocols:
                cell_dir = out / _slug(entry.name) / _slug(protocol) / _slug(method.name)
                try:
                    results.append(evaluate_cell(predictor, method, entry, protocol, cfg, cell_dir))
                except (ConfigError, DataError) as exc:
                    if len(suite.datasets) == 1:
                        raise
                    # e.g. a dataset of the suite that is not downloaded: the other cells still run
                    logger.warning("skipping %s | %s | %s: %s", method.name, entry.name, protocol, exc)
                    skip = {"dataset": entry.name, "protocol": protocol, "method": method.name, "reason": str(exc)}
                    skipped.append(skip)
    if not results:
        raise ConfigError("nothing was evaluated: " + "; ".join(s["reason"] for s in skipped))
    for r in results:
        r["panels"] = [str(Path(p).relative_to(out)) for p in r["panels"]]
    report.write_csv(out / "results.csv", [report.flat_row(r) for r in results])
    plot = report.plot_mae_vs_density(out / "mae_vs_density.png", results)
    comparisons = report.comparison_rows(results, suite.compare)
    if comparisons:
        report.write_csv(out / "comparison.csv", comparisons)
    report.write_report(
        out / "report.md",
        results,
        command=_command(cfg),
        plot=plot.name if plot else None,
        comparisons=comparisons,
        skipped=skipped,
    )
    return report.jsonable(
        {
            "out": str(out),
            "report": str(out / "report.md"),
            "cells": [
                {k: r.get(k) for k in ("dataset", "protocol", "method", "n_images", "mae", "rmse")}
                | {"fill_mae": r["fill"]["mae"]}
                for r in results
            ],
            "skipped": skipped,
            "gaps": [{k: row[k] for k in ("a", "b", "dataset", "protocol", "metric", "gap")} for row in comparisons],
        }
    )
