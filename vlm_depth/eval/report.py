"""Evaluation outputs: per-cell metrics.json and per-image CSV, the suite's results.csv, report.md (methods as
rows, a fill/keep table, label-free vs GT gaps), the MAE-vs-input-density plot and compare.png panels.

A "cell" result is the dict written to metrics.json: `dataset`, `protocol`, `method`, `n_images`, the metrics of
`vlm_depth.eval.metrics.METRIC_NAMES` over all evaluated pixels, and `fill` / `keep` sub-dicts with the same
metrics over the pixels where the input was missing / present. NaN is written as null.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.depth import colorize, depth_range, valid_mask
from vlm_depth.eval.metrics import METRIC_NAMES
from vlm_depth.files import atomic_path, atomic_write

# Report columns: (region or None for all pixels, metric, header, decimals). MAE/RMSE in meters, iMAE/iRMSE in
# 1/km; all lower-is-better except the threshold accuracies.
TABLE_COLUMNS = (
    (None, "mae", "MAE (m)", 3),
    (None, "rmse", "RMSE (m)", 3),
    (None, "imae", "iMAE (1/km)", 2),
    (None, "irmse", "iRMSE (1/km)", 2),
    (None, "absrel", "AbsRel", 4),
    (None, "delta1", "δ<1.25", 4),
)
FILL_KEEP_COLUMNS = (
    ("fill", "mae", "fill MAE (m)", 3),
    ("fill", "rmse", "fill RMSE (m)", 3),
    ("fill", "delta1", "fill δ<1.25", 4),
    ("keep", "mae", "keep MAE (m)", 3),
    ("keep", "rmse", "keep RMSE (m)", 3),
)
HIGHER_IS_BETTER = {"delta1", "delta_110", "delta_105"}
REGION_KEYS = ("fill", "keep")


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers and NaN/inf as None (JSON null), recursively."""
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as indented JSON with NaN/inf as null; returns the path."""
    return atomic_write(path, json.dumps(jsonable(data), indent=2) + "\n")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV (columns: union of keys in first-seen order; NaN as empty); returns the path."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        values = {k: jsonable(v) for k, v in row.items()}
        writer.writerow({k: "" if v is None else v for k, v in values.items()})
    return atomic_write(path, text.getvalue())


def flat_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One cell result as a flat CSV row: scalars as they are, `fill`/`keep` metrics as `fill_mae`, ..."""
    row = {k: v for k, v in result.items() if not isinstance(v, (Mapping, list, tuple))}
    for region in REGION_KEYS:
        for name in (*METRIC_NAMES, "n_images"):
            row[f"{region}_{name}"] = result.get(region, {}).get(name)
    return row


def _fmt(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{decimals}f}"


def _best(values: Sequence[Any], metric: str) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(set(finite)) < 2:  # nothing to single out
        return None
    return max(finite) if metric in HIGHER_IS_BETTER else min(finite)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a Markdown table: `header` cells, then one line per row of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def metric_table(
    results: Sequence[Mapping[str, Any]], columns: Sequence[tuple], count_region: str | None = None
) -> list[str]:
    """Methods as rows; the best value of each column (two or more methods) in bold; the last column counts the
    images averaged (over `count_region`'s pixels: images without any are excluded)."""

    def value(result: Mapping[str, Any], region: str | None, metric: str) -> Any:
        return (result.get(region, {}) if region else result).get(metric)

    best = {col: _best([value(r, *col[:2]) for r in results], col[1]) for col in columns}
    rows = []
    for result in results:
        cells = [f"`{result['method']}`"]
        for col in columns:
            v = value(result, *col[:2])
            text = _fmt(v, col[3])
            cells.append(f"**{text}**" if best[col] is not None and v == best[col] else text)
        cells.append(str(value(result, count_region, "n_images")))
        rows.append(cells)
    return markdown_table(["method", *(col[2] for col in columns), f"{count_region or 'all'} images"], rows)


def metric_gaps(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-metric difference a - b of two cell results (all pixels, and `fill_*` over the fill pixels)."""
    out: dict[str, float | None] = {}
    for prefix, ra, rb in (("", a, b), ("fill_", a.get("fill", {}), b.get("fill", {}))):
        for name in METRIC_NAMES:
            va, vb = ra.get(name), rb.get(name)
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (va, vb))
            out[prefix + name] = float(va - vb) if ok else None
    return out


def comparison_rows(results: Sequence[Mapping[str, Any]], pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each (method A, method B) pair and each dataset x protocol both were evaluated on: A, B and A - B per
    metric (the label-free vs GT-supervised comparison of the paper)."""
    by_key = {(r["dataset"], r["protocol"], r["method"]): r for r in results}
    rows = []
    for method_a, method_b in pairs:
        for dataset, protocol, method in by_key:
            if method != method_a or (dataset, protocol, method_b) not in by_key:
                continue
            a, b = by_key[(dataset, protocol, method_a)], by_key[(dataset, protocol, method_b)]
            gaps = metric_gaps(a, b)
            for name in ("mae", "rmse", "imae", "irmse", "absrel", "delta1", "fill_mae", "fill_rmse"):
                region, metric = ("fill", name[5:]) if name.startswith("fill_") else (None, name)
                rows.append(
                    {
                        "a": method_a,
                        "b": method_b,
                        "dataset": dataset,
                        "protocol": protocol,
                        "metric": name,
                        "value_a": (a.get(region, {}) if region else a).get(metric),
                        "value_b": (b.get(region, {}) if region else b).get(metric),
                        "gap": gaps[name],
                    }
                )
    return rows


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend: reports are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_mae_vs_density(path: str | Path, results: Sequence[Mapping[str, Any]]) -> Path | None:
    """MAE (m) against the mean input density (% of pixels, log scale), one line per method and one panel per
    dataset with at least two input densities; None (nothing written) when no dataset has two."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    datasets = _group(results, ("dataset_name",))
    plotted = {name: rs for (name,), rs in datasets.items() if len({r["input_density"] for r in rs}) >= 2}
    if not plotted:
        return None
    fig, axes = plt.subplots(1, len(plotted), figsize=(5 * len(plotted), 4), squeeze=False)
    for ax, (name, rs) in zip(axes[0], plotted.items()):
        for method in dict.fromkeys(r["method"] for r in rs):
            points = sorted((100 * r["input_density"], r["mae"]) for r in rs if r["method"] == method)
            points = [(x, y) for x, y in points if x > 0 and y is not None and math.isfinite(y)]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log")
        densities = sorted({100 * r["input_density"] for r in rs if r["input_density"] > 0})
        ax.set_xticks(densities, [f"{d:.3g}" for d in densities], rotation=45, ha="right")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes label minor ticks too: they overlap the majors
        ax.set_xlabel("input density (% of pixels with depth)")
        ax.set_ylabel("MAE (m)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def save_compare_panel(
    path: str | Path,
    rgb: np.ndarray,
    sparse: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    title: str = "",
) -> Path:
    """One row RGB | input | prediction | |error| for an image: rgb (H, W, 3) uint8; sparse, pred, gt (H, W) meters;
    mask (H, W) bool = evaluated pixels. Input and prediction share one depth colour scale; error is shown only where
    evaluated (meters)."""
    import cv2
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = pyplot()
    vrange = depth_range(np.where(mask, gt, 0) if mask.any() else pred)
    has_input = valid_mask(sparse)
    error = np.where(mask, np.abs(pred - gt), np.nan)
    erange = (0.0, max(float(np.nanpercentile(error, 98)) if mask.any() else 1.0, 1e-3))
    # Sparse points are thickened for visibility only; the colours are the input values.
    shown = sparse
    if has_input.mean() < 0.05:
        shown = cv2.dilate(np.where(has_input, sparse, 0).astype(np.float32), np.ones((3, 3), np.uint8))
    tiles = [
        ("RGB", rgb, None),
        (f"input ({100 * has_input.mean():.2f} % of pixels)", colorize(shown, vrange, "turbo"), None),
        ("prediction", colorize(pred, vrange, "turbo"), (vrange, "turbo")),
        ("|error| where evaluated", colorize(error, erange, "magma", valid=mask), (erange, "magma")),
    ]

    height, width = sparse.shape
    columns = 2 if width > 2 * height else 4  # wide frames (KITTI) as a 2x2 grid stay readable
    rows = 4 // columns
    fig, axes = plt.subplots(rows, columns, figsize=(16, rows * 16 / columns * height / width + 0.8), squeeze=False)
    for ax, (label, tile, scale) in zip(axes.ravel(), tiles):
        ax.imshow(tile, interpolation="nearest")
        ax.set_title(label)
        ax.axis("off")
        if scale is not None:
            (low, high), cmap = scale
            fig.colorbar(ScalarMappable(Normalize(low, high), cmap), ax=ax, fraction=0.046, label="m")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)


def _cell_notes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    first = results[0]
    n_gt, n_sensor = first["gt_source"].get("gt", 0), first["gt_source"].get("sensor", 0)
    notes = [
        f"Dataset `{first['dataset']}`" + (f" (split `{first['split']}`)" if first.get("split") else "") + ", "
        f"mean input density {100 * first['input_density']:.3f} % of pixels, "
        f"depth range (m) {first.get('min_depth') or 0} to {first['max_depth'] or 'no cap'}, "
        f"crop (top, bottom, left, right) {first['crop'] or 'none'}."
    ]
    if n_sensor:
        notes.append(
            f"**No ground truth for {n_sensor} of {n_gt + n_sensor} images: they are evaluated against their own "
            "sensor depth, which the protocol sparsifies (fill = sensor pixels hidden from the method).**"
        )
    if first.get("grid_note"):
        notes.append(first["grid_note"])
    skipped = first.get("n_no_input", 0)
    if skipped:
        notes.append(f"{skipped} images had no valid input pixel under this protocol: skipped for every method.")
    excluded = {r["method"]: r["n_excluded"] for r in results if r.get("n_excluded")}
    if excluded:
        notes.append(f"Images without evaluable pixels (NaN, excluded from the mean): {excluded}.")
    return notes


def write_report(
    path: str | Path,
    results: Sequence[Mapping[str, Any]],
    *,
    command: str,
    plot: str | None = None,
    comparisons: Sequence[Mapping[str, Any]] = (),
    skipped: Sequence[Mapping[str, str]] = (),
) -> Path:
    """report.md: per dataset x protocol a table with methods as rows and a fill/keep table; the density plot;
    label-free vs GT gaps (`comparisons` from `comparison_rows`); skipped cells with their reason."""
    lines = [
        "# vlm-depth evaluation",
        "",
        f"Command: `{command}`",
        "",
        "MAE and RMSE in meters, iMAE and iRMSE in 1/km (on 1000 / depth in m), AbsRel = mean |pred - gt| / gt, "
        "δ<1.25 = share of pixels within a factor 1.25; each computed per image over the pixels with a valid "
        "reference (inside the depth cap and crop), then averaged over images. **fill** = pixels where the input "
        "was missing (the completion), **keep** = pixels where it was given. Best value per column in bold.",
    ]
    for (dataset_name, protocol), rs in _group(results, ("dataset_name", "protocol")).items():
        lines += ["", f"## {dataset_name}: `{protocol}`", ""]
        lines += _cell_notes(rs)
        lines += ["", *metric_table(rs, TABLE_COLUMNS), "", "Fill / keep:", ""]
        lines += metric_table(rs, FILL_KEEP_COLUMNS, count_region="fill")
        panels = [(r["method"], p) for r in rs for p in r.get("panels", [])]
        if panels:
            lines += ["", "Panels (RGB | input | prediction | error): "]
            lines[-1] += ", ".join(f"[{method}]({p})" for method, p in panels)
    if plot:
        lines += ["", "## MAE vs input density", "", f"![MAE vs input density]({plot})"]
    if comparisons:
        lines += ["", "## Label-free vs GT supervision", "", "Gap = A - B (for errors, positive means A is worse)."]
        for (a, b), rows in _group(comparisons, ("a", "b")).items():
            lines += ["", f"A = `{a}`, B = `{b}`", ""]
            table = [
                [row["dataset"], f"`{row['protocol']}`", row["metric"]]
                + [_fmt(row[k], 4) for k in ("value_a", "value_b", "gap")]
                for row in rows
            ]
            lines += markdown_table(["dataset", "protocol", "metric", "A", "B", "A - B"], table)
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['dataset']} `{s['protocol']}` {s['method']}: {s['reason']}" for s in skipped]
    return atomic_write(path, "\n".join(lines) + "\n")


def _group(rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[Mapping[str, Any]]]:
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out
