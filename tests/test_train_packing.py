"""Packed training rows (one image prefix + K query blocks) give the logits and losses of the paper's one-pixel
conversations run separately through DepthVLM; labels, places and the numeric expectation are what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.processor import DepthProcessor
from vlm_depth.prompts.chat import ChatLayout
from vlm_depth.prompts.template import PromptTemplate
from vlm_depth.prompts.textualize import Query, Textualizer
from vlm_depth.train.collator import ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.packed import packed_forward


def _setup(tiny_ckpt, query_mode: str):
    from vlm_depth.model.pointer import add_pointer_token

    torch.manual_seed(0)
    # he_init: a depth branch that is not a no-op, so the depth path is part of what must match.
    cfg = DepthBranchConfig(fusion="he_init", query_mode=query_mode)
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=cfg, dtype=torch.float32).eval()
    processor = DepthProcessor.from_pretrained(tiny_ckpt)
    if query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    layout = ChatLayout(processor.tokenizer, Textualizer(PromptTemplate.load("paper"), query_mode))
    return model, processor, ExampleBuilder(processor, layout, QuerySpec()), layout


@pytest.fixture(scope="module")
def coords(tiny_ckpt):
    return _setup(tiny_ckpt, "coords")


def _image_and_queries(size, k, seed):
    rng = np.random.default_rng(seed)
    height, width = size
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = np.where(rng.random((height, width)) < 0.3, rng.uniform(0.5, 20, (height, width)), 0).astype(np.float32)
    queries = []
    for _ in range(k):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        if depth[y, x] > 0:
            queries.append(Query(x, y, "keep", float(depth[y, x]), float(depth[y, x])))
        else:
            queries.append(Query(x, y, "fill", None, float(rng.uniform(0.5, 99))))
    return rgb, depth, queries


def _separate(model, example, k, **extra):
    """Logits (T, V) of block k of `example` as its own sequence (prefix + block) through the plain forward."""
    keep = (example["segment_ids"] == 0) | (example["segment_ids"] == k)
    ids = example["input_ids"][keep][None]
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=example["pixel_values"],
            image_grid_thw=example["image_grid_thw"],
            depth_maps=example["depth_maps"],
            mm_token_type_ids=example["mm_token_type_ids"][keep][None],
            **extra,
        ).logits[0]
    return out[-int((example["segment_ids"] == k).sum()) :]


def _check_packed_equals_separate(model, builder, layout, k, sizes, pointer=False):
    examples = [builder.pack(*_image_and_queries(size, k, seed=10 * k + i)) for i, size in enumerate(sizes)]
    batch = collate_packed(examples, builder.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        packed = packed_forward(model, batch)
        predict_mask, _ = supervised_positions(batch["labels"])
        losses = answer_losses(packed_forward(model, batch, predict_mask), batch, torch.tensor(layout.digit_ids))
    per_query = losses.per_query_ce()
    query = 0
    for b, example in enumerate(examples):
        for block in range(1, k + 1):
            extra = {}
            if pointer:
                extra = {"pointer_xy": example["pointer_xy"][block - 1 : block]}
            single = _separate(model, example, block, **extra)
            row = batch["segment_ids"][b] == block
            torch.testing.assert_close(packed[b, row], single, atol=1e-4, rtol=0)
            # the query's loss: mean CE of its answer tokens, each predicted from the previous position
            labels = example["labels"][example["segment_ids"] == block]
            supervised = labels[1:] != -100
            single_ce = torch.nn.functional.cross_entropy(single[:-1][supervised], labels[1:][supervised])
            assert abs(float(per_query[query]) - float(single_ce)) <= 1e-4
            query += 1
    assert query == len(batch["targets"])


@pytest.mark.parametrize("k", [1, 3, 16])
def test_packed_logits_and_losses_equal_separate_sequences(coords, k):
    model, _, builder, layout = coords
    # two images of different sizes in one batch (different prefix lengths, different image grids)
    _check_packed_equals_separate(model, builder, layout, k, sizes=[(48, 64), (70, 90)])


def test_packed_pointer_queries_equal_separate_sequences(tiny_ckpt):
    model, _, builder, layout = _setup(tiny_ckpt, "pointer")
    _check_packed_equals_separate(model, builder, layout, 3, sizes=[(48, 64), (60, 60)], pointer=True)


def test_labels_cover_exactly_the_answer_tokens(coords):
    _, processor, builder, layout = coords
    rgb, depth, queries = _image_and_queries((48, 64), 3, seed=1)
    example = builder.pack(rgb, depth, queries)
    tok = processor.tokenizer
    for k, query in enumerate(queries, start=1):
        block = example["segment_ids"] == k
        supervised = example["labels"][block] != -100
        assert torch.equal(example["labels"][block][supervised], example["input_ids"][block][supervised])
        answer = tok.decode(example["labels"][block][supervised])
        assert answer == layout.textualizer.answer(query.label) + "<|im_end|>"
        # supervised tokens are the block's tail: nothing of the prompt is a label
        first = int(supervised.nonzero()[0])
        assert supervised[first:].all() and not supervised[:first].any()
    assert (example["labels"][example["segment_ids"] == 0] == -100).all()


def test_label_free_example_hides_held_out_points(coords):
    """Label-free fill labels are held-out input points: absent from depth_maps and from every prompt."""
    from vlm_depth.data.sample import RGBDSample

    _, processor, _, layout = coords
    builder = ExampleBuilder(
        processor, layout, QuerySpec(label_source="sparse", queries_per_image=8, holdout_ratio=0.3)
    )
    rng = np.random.default_rng(5)
    # distinct values 10 mm apart, so a formatted label names exactly one input point
    valid = rng.random((48, 64)) < 0.2
    depth = np.zeros((48, 64), dtype=np.float32)
    depth[valid] = 0.5 + 0.01 * rng.permutation(int(valid.sum()))
    gt = np.full((48, 64), np.nan, dtype=np.float32)
    sample = RGBDSample(rgb=rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), depth=depth, name="poisoned")
    sample.gt = gt  # poisoned after validation: label-free code must never read it
    example = builder(sample, np.random.default_rng(0), 0)
    fills = example["targets"][example["is_fill"]]
    assert len(fills) > 0
    text = processor.tokenizer.decode(example["input_ids"][example["labels"] == -100])
    for value in fills.tolist():
        (measured,) = depth[np.isclose(depth, value, atol=5e-4)]  # the held-out input point it came from
        assert not (example["depth_maps"] == measured).any()
        assert f"{value:.3f}" not in text


def test_places_give_the_number_back(coords):
    """Place values of the number tokens, applied to the label's own digits, rebuild the label."""
    _, processor, builder, layout = coords
    example = builder.pack(*_image_and_queries((48, 64), 5, seed=2))
    digit_of = {t: d for d, t in enumerate(layout.digit_ids)}
    for k, target in enumerate(example["targets"].tolist()):
        block = example["query_ids"] == k
        ids, places = example["input_ids"][block], example["places"][block]
        value = sum(p * digit_of[int(t)] for t, p in zip(ids, places) if p != 0)
        assert float(value) == pytest.approx(target, abs=1e-4)  # float32 targets
