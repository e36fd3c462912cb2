"""The textualizer: per-pixel fill/keep prompt, pixel identification, question and answer label, plus the choice of
query pixels and labels for training (label-free from held-out sparse points, or from dense ground truth).

The text comes from a `PromptTemplate` (`vlm_depth.prompts.template`); numbers are written by
`numbers.format_meters`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.prompts.numbers import format_meters
from vlm_depth.prompts.template import PromptTemplate

QueryMode = Literal["coords", "pointer"]
STRATA = 8  # bins of the stratified samplers


@dataclass(frozen=True)
class Query:
    """One pixel query. `x`, `y`: column and row in the ORIGINAL input image. `kind`: "fill" (no depth given) or
    "keep" (`given` = input depth in meters). `label`: answer in meters (None at inference)."""

    x: int
    y: int
    kind: Literal["fill", "keep"]
    given: float | None = None
    label: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fill", "keep"):
            raise ValueError(f"query kind must be 'fill' or 'keep', got {self.kind!r}")
        if self.kind == "fill" and self.given is not None:
            raise ValueError("a fill query has no given depth (it would leak its answer into the prompt)")


class Textualizer:
    """Writes the text of pixel queries and answers for one template, query mode and number format."""

    def __init__(
        self,
        template: PromptTemplate,
        query_mode: QueryMode = "coords",
        decimals: int = 3,
        pointer_token: str = "<|depth_pointer|>",
    ) -> None:
        if query_mode not in ("coords", "pointer"):
            raise ConfigError(f"query_mode must be 'coords' or 'pointer', got {query_mode!r}")
        if not getattr(template, query_mode):
            raise ConfigError(f"prompt template {template.name!r} has no `{query_mode}` text for the query mode")
        if query_mode == "pointer":
            others = [f.name for f in fields(template) if pointer_token in getattr(template, f.name)]
            if others:
                raise ConfigError(f"template {template.name!r} uses the pointer token {pointer_token} in {others}")
        template.validate()
        self.template = template
        self.query_mode = query_mode
        self.decimals = decimals
        self.pointer_token = pointer_token
        self._prefix, self._suffix = template.answer.split("{y}")

    def instruction(self) -> str:
        """Shared text placed once after the image ("" for the paper's template)."""
        return self.template.instruction

    def mask_prompt(self, q: Query) -> str:
        """The fill or keep prompt of `q` (the keep prompt carries the given depth if the template has `{x}`)."""
        if q.kind == "fill":
            return self.template.fill
        if "{x}" not in self.template.keep:
            return self.template.keep
        if q.given is None:
            raise ValueError(f"keep query at ({q.x}, {q.y}) has no given depth for template {self.template.name!r}")
        return self.template.keep.replace("{x}", format_meters(q.given, self.decimals))

    def pixel_text(self, grid_xy: tuple[int, int]) -> str:
        """How the pixel is named: its (column, row) on the resized grid, or exactly one pointer token."""
        if self.query_mode == "pointer":
            return self.template.pointer.replace("{pointer}", self.pointer_token)
        u, v = (_whole(c) for c in grid_xy)
        return self.template.coords.replace("{u}", str(u)).replace("{v}", str(v))

    def query_prompt(self, q: Query, grid_xy: tuple[int, int]) -> str:
        """User-side text of one query: fill/keep prompt, pixel identification, question (empty parts skipped).

        `grid_xy`: the pixel's (column, row) on the image grid the Qwen2.5-VL processor resized to.
        """
        parts = (self.mask_prompt(q), self.pixel_text(grid_xy), self.template.question)
        return " ".join(p for p in parts if p)

    def answer_prefix(self) -> str:
        """Answer text before the number (forced by the decoder), e.g. "The pixel is "."""
        return self._prefix

    def answer_suffix(self) -> str:
        """Answer text after the number, e.g. " meters away from the camera."."""
        return self._suffix

    def answer(self, y: float) -> str:
        """Full answer for a depth of `y` meters."""
        return self._prefix + format_meters(y, self.decimals) + self._suffix


def _whole(value: float) -> int:
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(f"grid coordinates are whole pixels, got {value}")
        return int(value)
    return operator.index(value)


def select_queries(
    depth: np.ndarray,
    gt: np.ndarray | None,
    *,
    label_source: Literal["sparse", "gt"],
    queries_per_image: int,
    keep_ratio: float,
    holdout_ratio: float,
    sampling: Literal["uniform", "depth_stratified", "distance"] = "uniform",
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[Query]]:
    """Choose the training queries of one image; returns `(shown_depth, queries)`.

    `depth` (H, W) meters is the sparse input. First `round(holdout_ratio * valid points)` of its points, drawn
    uniformly, are held out: removed from `shown_depth` (float32 meters, 0 = missing) and so from the depth branch
    and from every keep prompt. Then `round(keep_ratio * queries_per_image)` keep queries are drawn from the shown
    points (label = given = the shown value) and the rest are fill queries:
    - `label_source="sparse"` (label-free): fill queries at held-out points, labelled with their measured value.
      `gt` is never read (it may be None).
    - `label_source="gt"`: fill queries at pixels with valid `gt` (H, W) where `shown_depth` is missing, labelled
      with the GT.
    A short pool gives fewer queries, never duplicates. `sampling` picks within each pool: "uniform";
    "depth_stratified" (each of `STRATA` equal-width log-depth bins equally likely, so far and near pixels are
    balanced); "distance" (fill queries stratified by distance to the nearest shown point; keep queries, at
    distance 0 by definition, uniform). Fill and keep queries are returned shuffled together.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise DataError(f"depth must be (H, W) meters, got shape {depth.shape}")
    if label_source not in ("sparse", "gt"):
        raise ConfigError(f"label_source must be 'sparse' or 'gt', got {label_source!r}")
    if sampling not in ("uniform", "depth_stratified", "distance"):
        raise ConfigError(f"sampling must be 'uniform', 'depth_stratified' or 'distance', got {sampling!r}")
    for name, ratio in (("keep_ratio", keep_ratio), ("holdout_ratio", holdout_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {ratio}")
    if queries_per_image < 0:
        raise ConfigError(f"queries_per_image must be >= 0, got {queries_per_image}")

    valid = valid_mask(depth)
    shown = np.where(valid, depth, 0).astype(np.float32)
    points = np.flatnonzero(valid)
    held = rng.choice(points, size=round(holdout_ratio * points.size), replace=False)
    shown.flat[held] = 0

    if label_source == "sparse":
        fill_pool, fill_labels = held, depth.flat[held].astype(np.float32)
    else:
        if gt is None:
            raise DataError("label_source='gt' needs ground truth, but gt is None")
        gt = np.asarray(gt)
        if gt.shape != depth.shape:
            raise DataError(f"gt has shape {gt.shape}, the depth input {depth.shape}")
        fill_pool = np.flatnonzero(valid_mask(gt) & (shown == 0))
        fill_labels = gt.flat[fill_pool].astype(np.float32)
    keep_pool = np.flatnonzero(shown > 0)
    keep_labels = shown.flat[keep_pool]

    n_keep = round(keep_ratio * queries_per_image)
    if sampling == "distance" and fill_pool.size and keep_pool.size:
        from scipy.ndimage import distance_transform_edt

        fill_strata = distance_transform_edt(shown == 0).flat[fill_pool]
    elif sampling == "depth_stratified":
        fill_strata = np.log(fill_labels)
    else:
        fill_strata = None
    keep_strata = np.log(keep_labels) if sampling == "depth_stratified" else None
    fill = _pick(fill_pool.size, queries_per_image - n_keep, fill_strata, rng)
    keep = _pick(keep_pool.size, n_keep, keep_strata, rng)

    width = depth.shape[1]
    queries = [
        Query(int(p % width), int(p // width), "fill", None, float(v))
        for p, v in zip(fill_pool[fill], fill_labels[fill])
    ]
    queries += [
        Query(int(p % width), int(p // width), "keep", float(v), float(v))
        for p, v in zip(keep_pool[keep], keep_labels[keep])
    ]
    order = rng.permutation(len(queries))
    return shown, [queries[i] for i in order]


def _pick(size: int, count: int, strata: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of `min(count, size)` distinct pool members; with `strata` values, each equal-width bin of them is
    equally likely per draw (weight 1 / members of the bin)."""
    count = min(count, size)
    if count <= 0:
        return np.zeros(0, dtype=int)
    if strata is None or math.isclose(float(strata.min()), float(strata.max())):
        return rng.choice(size, size=count, replace=False)
    edges = np.linspace(strata.min(), strata.max(), STRATA + 1)[1:-1]
    bins = np.searchsorted(edges, strata, side="right")
    weights = 1.0 / np.bincount(bins, minlength=STRATA)[bins]
    return rng.choice(size, size=count, replace=False, p=weights / weights.sum())
