"""Textualizer: the paper's exact strings, the ablation templates, query modes, template validation, and label
selection (label-free held-out points never leak; GT fill queries; stratified sampling)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vlm_depth.errors import ConfigError, DataError
from vlm_depth.prompts.numbers import format_meters
from vlm_depth.prompts.template import PromptTemplate
from vlm_depth.prompts.textualize import Query, Textualizer, select_queries

FILL = "The mask value is 0; predict the distance to the camera."
KEEP_1_5 = "The mask value is 1, and the distance to the camera is 1.500 meters, preserve the given value."
QUESTION = "What is the distance from the current pixel to the camera?"
POINTER = "<|depth_pointer|>"


@pytest.fixture(scope="module")
def paper() -> Textualizer:
    return Textualizer(PromptTemplate.load("paper"))


def test_paper_template_produces_the_papers_exact_strings(paper):
    assert paper.mask_prompt(Query(0, 0, "fill")) == FILL
    assert paper.mask_prompt(Query(0, 0, "keep", given=1.5)) == KEEP_1_5
    assert paper.template.question == QUESTION
    assert paper.answer(2.345) == "The pixel is 2.345 meters away from the camera."
    assert paper.answer(0.1) == "The pixel is 0.100 meters away from the camera."
    assert paper.answer_prefix() == "The pixel is "
    assert paper.answer_suffix() == " meters away from the camera."
    assert paper.answer_prefix() + format_meters(7.25) + paper.answer_suffix() == paper.answer(7.25)
    assert paper.instruction() == ""


def test_query_prompt_is_mask_prompt_then_pixel_coordinates_then_question(paper):
    fill = paper.query_prompt(Query(5, 9, "fill", label=3.0), (12, 34))
    assert fill == f"{FILL} The current pixel is at (12, 34). {QUESTION}"
    keep = paper.query_prompt(Query(5, 9, "keep", given=1.5, label=1.5), (np.int64(3), 4.0))
    assert keep == f"{KEEP_1_5} The current pixel is at (3, 4). {QUESTION}"
    with pytest.raises(ValueError, match="whole pixels"):
        paper.query_prompt(Query(5, 9, "fill"), (3.5, 4))


def test_pointer_mode_places_exactly_one_pointer_token_and_no_coordinates():
    pointer = Textualizer(PromptTemplate.load("paper"), query_mode="pointer")
    text = pointer.query_prompt(Query(5, 9, "fill"), (12, 34))
    assert text.count(POINTER) == 1
    assert text == f"{FILL} The current pixel is {POINTER}. {QUESTION}"
    assert "12" not in text and "34" not in text
    assert pointer.query_prompt(Query(5, 9, "keep", given=2.0), (12, 34)).count(POINTER) == 1


def test_ablation_templates_drop_the_prompt_or_the_value():
    bare = Textualizer(PromptTemplate.load("no_prompt"))
    assert bare.query_prompt(Query(1, 2, "keep", given=4.321), (1, 2)) == f"The current pixel is at (1, 2). {QUESTION}"
    assert bare.query_prompt(Query(1, 2, "fill"), (1, 2)) == f"The current pixel is at (1, 2). {QUESTION}"
    mask_only = Textualizer(PromptTemplate.load("mask_only"))
    keep = mask_only.query_prompt(Query(1, 2, "keep", given=4.321), (1, 2))
    assert keep.startswith("The mask value is 1") and "4.321" not in keep
    assert mask_only.query_prompt(Query(1, 2, "fill"), (1, 2)).startswith(FILL)
    for textualizer in (bare, mask_only):
        assert textualizer.answer(4.321) == "The pixel is 4.321 meters away from the camera."


def test_fill_query_cannot_carry_a_given_depth_and_keep_needs_one(paper):
    with pytest.raises(ValueError, match="leak"):
        Query(0, 0, "fill", given=1.0)
    with pytest.raises(ValueError, match="no given depth"):
        paper.mask_prompt(Query(0, 0, "keep"))


def _write(tmp_path, **keys) -> str:
    base = {"name": "t", "fill": "f.", "keep": "k {x}.", "question": "q?", "answer": "a {y} m.", "coords": "({u},{v})"}
    base.update(keys)
    path = tmp_path / "t.yaml"
    path.write_text("".join(f"{k}: {v!r}\n" for k, v in base.items() if v is not None))
    return str(path)


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"answer": "a m."}, "exactly once"),
        ({"answer": "a {y} {y}"}, "exactly once"),
        ({"fill": "f {x}"}, "not allowed"),
        ({"question": "q {y}?"}, "not allowed"),
        ({"coords": "({u})"}, "exactly once"),
        ({"color": "red"}, "unknown keys"),
        ({"question": None}, "missing keys"),
    ],
)
def test_bad_template_files_raise_config_error_naming_the_file(tmp_path, keys, message):
    path = _write(tmp_path, **keys)
    with pytest.raises(ConfigError, match=message) as info:
        PromptTemplate.load(path)
    assert "t.yaml" in str(info.value) or "template" in str(info.value)


def test_query_mode_needs_its_template_text(tmp_path):
    template = PromptTemplate.load(_write(tmp_path))
    with pytest.raises(ConfigError, match="pointer"):
        Textualizer(template, query_mode="pointer")
    with pytest.raises(ConfigError, match="query_mode"):
        Textualizer(template, query_mode="text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="available"):
        PromptTemplate.load("no_such_template")


class Poison:
    """Ground truth that fails the test if anything converts or indexes it."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("label-free selection read the ground truth")

    def __getitem__(self, item):
        raise AssertionError("label-free selection read the ground truth")


def _sparse_input(seed: int, shape=(48, 64), n_points: int = 300) -> np.ndarray:
    """Sparse depth whose valid values are all distinct at millimetre resolution, plus NaN/inf/negative junk."""
    rng = np.random.default_rng(seed)
    depth = np.zeros(shape, dtype=np.float32)
    pixels = rng.choice(depth.size, size=n_points + 30, replace=False)
    depth.flat[pixels[:n_points]] = rng.choice(np.arange(500, 20_000), size=n_points, replace=False) / 1000
    depth.flat[pixels[n_points:]] = rng.choice([np.nan, np.inf, -2.0], size=30)
    return depth


@pytest.mark.parametrize("gt_kind", ["none", "nan", "poison"])
def test_label_free_held_out_values_never_reach_the_depth_input_or_any_prompt(paper, gt_kind):
    pointer = Textualizer(PromptTemplate.load("paper"), query_mode="pointer")
    for seed in range(40):
        depth = _sparse_input(seed)
        gt = {"none": None, "nan": np.full(depth.shape, np.nan, np.float32), "poison": Poison()}[gt_kind]
        rng = np.random.default_rng(1000 + seed)
        shown, queries = select_queries(
            depth, gt, label_source="sparse", queries_per_image=60, keep_ratio=0.3, holdout_ratio=0.2, rng=rng
        )
        valid = np.isfinite(depth) & (depth > 0)
        held = valid & (shown == 0)
        assert held.sum() == round(0.2 * valid.sum())
        assert np.isfinite(shown).all() and shown.dtype == np.float32
        np.testing.assert_array_equal(shown[valid & ~held], depth[valid & ~held])
        # No held-out value anywhere in the depth input ...
        held_values = {format_meters(float(v)) for v in depth[held]}
        assert not held_values & {format_meters(float(v)) for v in shown[shown > 0]}
        # ... nor in any prompt of this image (every query, both query modes).
        prompts = " ".join(
            t.query_prompt(q, (q.x, q.y)) + " " + t.instruction() for q in queries for t in (paper, pointer)
        )
        assert not held_values & set(re.findall(r"\d+\.\d{3}", prompts))
        fills = [q for q in queries if q.kind == "fill"]
        keeps = [q for q in queries if q.kind == "keep"]
        assert len(keeps) == round(0.3 * 60) and len(fills) == 60 - len(keeps)
        for q in fills:
            assert held[q.y, q.x] and q.given is None and q.label == float(depth[q.y, q.x])
        for q in keeps:
            assert shown[q.y, q.x] > 0 and q.given == q.label == float(shown[q.y, q.x])
        assert len({(q.x, q.y) for q in queries}) == len(queries)


def test_label_free_selection_is_identical_whatever_the_gt(paper):
    depth = _sparse_input(0)
    results = [
        select_queries(
            depth,
            gt,
            label_source="sparse",
            queries_per_image=30,
            keep_ratio=0.5,
            holdout_ratio=0.3,
            sampling="distance",
            rng=np.random.default_rng(5),
        )
        for gt in (None, np.full(depth.shape, np.nan), Poison())
    ]
    for shown, queries in results[1:]:
        np.testing.assert_array_equal(shown, results[0][0])
        assert queries == results[0][1]


def test_gt_labels_fill_pixels_where_the_input_is_missing():
    rng = np.random.default_rng(3)
    gt = rng.uniform(1.0, 9.0, (48, 64)).astype(np.float32)
    gt[:10] = 0.0  # no GT in the top rows
    depth = _sparse_input(1)
    shown, queries = select_queries(
        depth, gt, label_source="gt", queries_per_image=200, keep_ratio=0.25, holdout_ratio=0.0, rng=rng
    )
    valid = np.isfinite(depth) & (depth > 0)
    np.testing.assert_array_equal(shown, np.where(valid, depth, 0))
    fills = [q for q in queries if q.kind == "fill"]
    keeps = [q for q in queries if q.kind == "keep"]
    assert len(fills) == 150 and len(keeps) == 50
    for q in fills:
        assert shown[q.y, q.x] == 0 and gt[q.y, q.x] > 0 and q.label == float(gt[q.y, q.x]) and q.given is None
    for q in keeps:
        assert q.given == q.label == float(depth[q.y, q.x])
    with pytest.raises(DataError, match="ground truth"):
        select_queries(depth, None, label_source="gt", queries_per_image=4, keep_ratio=0, holdout_ratio=0, rng=rng)
    with pytest.raises(DataError, match="shape"):
        select_queries(depth, gt[:10], label_source="gt", queries_per_image=4, keep_ratio=0, holdout_ratio=0, rng=rng)


def test_short_pools_give_fewer_queries_never_duplicates():
    depth = np.zeros((8, 8), np.float32)
    depth.flat[:10] = np.arange(1, 11)
    shown, queries = select_queries(
        depth,
        None,
        label_source="sparse",
        queries_per_image=100,
        keep_ratio=0.5,
        holdout_ratio=0.3,
        rng=np.random.default_rng(0),
    )
    assert sum(q.kind == "fill" for q in queries) == 3 and sum(q.kind == "keep" for q in queries) == 7


@pytest.mark.parametrize(
    "bad",
    [
        {"keep_ratio": 1.5},
        {"holdout_ratio": -0.1},
        {"sampling": "nearest"},
        {"label_source": "dense"},
        {"queries_per_image": -1},
    ],
)
def test_bad_selection_settings_raise_config_error(bad):
    kwargs = dict(
        label_source="sparse", queries_per_image=4, keep_ratio=0.5, holdout_ratio=0.5, rng=np.random.default_rng(0)
    )
    with pytest.raises(ConfigError):
        select_queries(_sparse_input(0), None, **{**kwargs, **bad})


def _share_of_queries(depth, gt, sampling: str, predicate) -> float:
    """Share of GT-labelled fill queries (100 per draw, 10 seeds) for which `predicate(query)` holds."""
    hits = []
    for seed in range(10):
        _, queries = select_queries(
            depth,
            gt,
            label_source="gt",
            queries_per_image=100,
            keep_ratio=0.0,
            holdout_ratio=0.0,
            sampling=sampling,
            rng=np.random.default_rng(seed),
        )
        hits += [predicate(q) for q in queries]
    return float(np.mean(hits))


def test_depth_stratified_sampling_balances_near_and_far_pixels():
    rng = np.random.default_rng(0)
    gt = np.full((64, 64), 1.0, np.float32)
    gt[rng.random(gt.shape) < 0.05] = 20.0  # 5 % far pixels
    depth = np.zeros_like(gt)

    assert _share_of_queries(depth, gt, "uniform", lambda q: q.label > 10) < 0.1
    assert _share_of_queries(depth, gt, "depth_stratified", lambda q: q.label > 10) > 0.35


def test_distance_sampling_favours_pixels_far_from_the_input():
    gt = np.full((64, 64), 2.0, np.float32)
    depth = np.zeros_like(gt)
    depth[::4, :40:4] = 3.0  # input points on the left; the right third is far from any
    far_from_input = np.zeros(gt.shape, bool)
    far_from_input[:, 48:] = True

    def far(q) -> bool:
        return far_from_input[q.y, q.x]

    uniform, distance = _share_of_queries(depth, gt, "uniform", far), _share_of_queries(depth, gt, "distance", far)
    assert distance > uniform + 0.15
