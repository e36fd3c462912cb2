"""Training examples with K pixel queries packed per image, and the collator that batches them.

One image gives one packed row (`vlm_depth.prompts.chat.ChatLayout`): the prefix (system turn, user turn with the
image) once, then K query blocks, each = fill/keep prompt with the pixel + question, assistant header, answer. The
depth branch sees `shown_depth` from `select_queries`, so in label-free mode the held-out points (the fill labels)
reach neither the depth branch nor any prompt. K = 1 is exactly the paper's one-pixel conversation.

Row tensors (per token): `input_ids`; `segment_ids` (`PREFIX` = 0, block k >= 1, `PAD` = -1, see
`vlm_depth.model.packing`); `labels` (-100 except answer tokens: answer prefix words, number, suffix, end of turn;
unshifted, Hugging Face convention: token t + 1 is predicted at position t); `places` (place value of each number
digit, 0 elsewhere) and `query_ids` (index of the token's query in the batch, -1 outside blocks). Per query:
`targets` (label in meters as written, i.e. rounded to the template's decimals) and `is_fill`. Per image: the
processor's `pixel_values`, `image_grid_thw` and `depth_maps`, and with an MDM spec `mdm_labels` and
`mdm_patch_mask` in the layout of `depth_maps` (`vlm_depth.train.mdm.mdm_fields`: the same split, the same depth
map and the same rng as the queries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vlm_depth.data.sample import RGBDSample
from vlm_depth.data.sparsify import sparse_input
from vlm_depth.errors import DataError
from vlm_depth.model.packing import PAD, PREFIX
from vlm_depth.prompts.chat import ChatLayout
from vlm_depth.prompts.digits import digit_places
from vlm_depth.prompts.numbers import format_meters
from vlm_depth.prompts.textualize import Query, select_queries
from vlm_depth.train.mdm import MDMSpec, mdm_fields

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100  # label of tokens without a loss (Hugging Face convention)


@dataclass
class QuerySpec:
    """How the queries of one image are chosen (see `select_queries`) and how its sparse input is made."""

    label_source: Literal["sparse", "gt"] = "sparse"
    queries_per_image: int = 16
    keep_ratio: float = 0.2
    holdout_ratio: float = 0.1
    sampling: Literal["uniform", "depth_stratified", "distance"] = "uniform"
    protocol: str = "sensor"
    mdm: MDMSpec | None = None  # MDM masking policy; None = no MDM fields


class ExampleBuilder:
    """Turns one `RGBDSample` into one packed row (a dict of tensors); deterministic given `rng` and `seed`."""

    def __init__(self, processor, layout: ChatLayout, spec: QuerySpec) -> None:
        self.processor = processor
        self.layout = layout
        self.spec = spec
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.prefix_text = layout.prefix_text()

    def __call__(self, sample: RGBDSample, rng: np.random.Generator, seed: int) -> Batch:
        spec = self.spec
        sensor, reference = sample.on_rgb_grid()
        depth = sparse_input(spec.protocol, sample.rgb, sensor, reference, sample.intrinsics, seed)
        # Label-free: the ground truth is never read for labels (it may be absent or poisoned).
        gt = reference if spec.label_source == "gt" else None
        if spec.label_source == "gt" and gt is None:
            raise DataError(f"{sample.name}: label_source 'gt' needs ground truth, but the sample has none")
        shown, queries = select_queries(
            depth,
            gt,
            label_source=spec.label_source,
            queries_per_image=spec.queries_per_image,
            keep_ratio=spec.keep_ratio,
            holdout_ratio=spec.holdout_ratio,
            sampling=spec.sampling,
            rng=rng,
        )
        example = self.pack(sample.rgb, shown, queries)
        if spec.mdm is not None:
            ip = self.processor.image_processor
            example |= mdm_fields(depth, shown, gt, spec.label_source, example, rng, ip, spec.mdm)
        return example

    def pack(self, rgb: np.ndarray, shown_depth: np.ndarray, queries: Sequence[Query]) -> Batch:
        """Packed row of the image `rgb` (H, W, 3) uint8 with depth input `shown_depth` (H, W) meters and labelled
        `queries` (pixel coordinates of `rgb`)."""
        enc = self.processor(rgb=rgb, depth=shown_depth, text=self.prefix_text)
        prefix = enc["input_ids"][0].tolist()
        # per-token columns, built segment by segment: the prefix, then one block per query
        ids, segments, labels = list(prefix), [PREFIX] * len(prefix), [IGNORE_INDEX] * len(prefix)
        places, query_ids = [0.0] * len(prefix), [-1] * len(prefix)
        pointer_xy, targets = [], []
        for k, query in enumerate(queries):
            grid_xy = self.processor.to_grid_xy(query.x, query.y, rgb.shape)
            block = self.layout.query_tokens(query, grid_xy, query.label)
            tokens, answer = block.ids(), block.answer_slice()
            block_labels = [IGNORE_INDEX] * len(tokens)
            block_labels[answer] = tokens[answer]
            number_start = len(block.prompt) + len(block.answer_prefix)
            block_places = [0.0] * len(tokens)
            block_places[number_start : number_start + len(block.number)] = digit_places(
                block.number, self.layout.digit_ids, self.layout.point_id
            )
            ids += tokens
            segments += [k + 1] * len(tokens)
            labels += block_labels
            places += block_places
            query_ids += [k] * len(tokens)
            pointer_xy += block.pointer_xy
            targets.append(float(format_meters(query.label, self.layout.textualizer.decimals)))
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "segment_ids": torch.tensor(segments, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "places": torch.tensor(places, dtype=torch.float32),
            "query_ids": torch.tensor(query_ids, dtype=torch.long),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"],
            "depth_maps": enc["depth_maps"],
            "pointer_xy": torch.tensor(pointer_xy, dtype=torch.float32).reshape(-1, 2),
            "targets": torch.tensor(targets, dtype=torch.float32),
            "is_fill": torch.tensor([q.kind == "fill" for q in queries], dtype=torch.bool),
        }


def num_queries(batch: Batch) -> int:
    """The number of query blocks (labelled pixels) in a packed example or batch."""
    return len(batch["targets"])


def collate_packed(examples: Sequence[Batch], pad_token_id: int) -> Batch:
    """Batch packed rows: right-pad the per-token tensors (padding is segment `PAD`), concatenate the images in row
    order (as the processor concatenates them), and renumber queries across the batch. Adds `pointer_image_index`."""
    length = max(len(e["input_ids"]) for e in examples)
    pad_values = {"input_ids": pad_token_id, "segment_ids": PAD, "labels": IGNORE_INDEX, "places": 0.0}
    pad_values |= {"query_ids": -1, "mm_token_type_ids": 0}
    batch: Batch = {}
    for key, value in pad_values.items():
        rows = [torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=value) for e in examples]
        batch[key] = torch.stack(rows)
    offset = 0
    for row, example in zip(batch["query_ids"], examples):
        row[row >= 0] += offset
        offset += num_queries(example)
    for key in ("pixel_values", "image_grid_thw", "depth_maps", "pointer_xy", "targets", "is_fill"):
        batch[key] = torch.cat([e[key] for e in examples])
    for key in ("mdm_labels", "mdm_patch_mask"):
        if key in examples[0]:
            batch[key] = torch.cat([e[key] for e in examples])
    batch["pointer_image_index"] = torch.cat(
        [torch.full((len(e["pointer_xy"]),), i, dtype=torch.long) for i, e in enumerate(examples)]
    )
    return batch
