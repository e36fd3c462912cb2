"""A briefly trained tiny DepthVLM for the decoder and completion tests: teacher-forced answers on a simple scene for
a few dozen AdamW steps, so the model writes plausible numbers (metres, not 999.999) with clear margins between the
best and second-best digits. Trained once per test session and saved as an ordinary vlm-depth checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlm_depth.infer.readouts import chat_layout
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.packing import PAD, block_attention_mask, packed_position_ids
from vlm_depth.model.pointer import add_pointer_token
from vlm_depth.model.processor import DepthProcessor
from vlm_depth.prompts.textualize import Query


def scene(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 and dense depth (H, W) float32 meters of a tilted floor-and-wall scene whose colour
    follows depth (plus texture), so depth is predictable from the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    wall = xx > width * rng.uniform(0.4, 0.7)
    depth = np.where(wall, 1.5 + 2.0 * yy / height, 3.0 + 1.5 * xx / width).astype(np.float32)
    hue = (depth - 1.0) / 4.0
    rgb = np.stack([200 * hue, 120 + 80 * wall, 220 * (1 - hue)], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), depth


def _packed_example(processor, layout, rgb, sparse, gt, rng, k):
    """One packed row: prefix + k labelled query blocks (half keep, half fill), labels on the answer tokens."""
    inputs = processor(rgb, sparse, text=layout.prefix_text())
    valid = np.argwhere(sparse > 0)
    missing = np.argwhere(sparse == 0)
    picks = [("keep", valid[i]) for i in rng.choice(len(valid), k // 2, replace=False)]
    picks += [("fill", missing[i]) for i in rng.choice(len(missing), k - k // 2, replace=False)]
    ids = [inputs["input_ids"][0]]
    labels = [torch.full_like(inputs["input_ids"][0], -100)]
    pointers = []
    for kind, (row, col) in picks:
        given = float(sparse[row, col]) if kind == "keep" else None
        query = Query(int(col), int(row), kind, given, float(gt[row, col]))
        block = layout.query_tokens(query, processor.to_grid_xy(col, row, rgb.shape), label=float(gt[row, col]))
        block_ids = torch.tensor(block.ids())
        block_labels = torch.full_like(block_ids, -100)
        block_labels[block.answer_slice()] = block_ids[block.answer_slice()]
        ids.append(block_ids)
        labels.append(block_labels)
        pointers += block.pointer_xy
    segments = torch.cat([torch.full((len(t),), s) for s, t in enumerate(ids)])[None]
    input_ids, labels = torch.cat(ids)[None], torch.cat(labels)[None]
    mm_types = (input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return inputs, input_ids, labels, segments, mm_types, pointers


def train_tiny(base: Path, out: Path, query_mode: str, steps: int = 40, seed: int = 0) -> Path:
    """Attach a fresh `he_init` depth branch to the tiny model `base`, train its language model for `steps` steps
    and save the checkpoint to `out` (kept if it already exists)."""
    if (out / "vlm_depth_config.json").is_file():
        return out
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # Narrow branch convs: the naive reference re-runs the branch for every query, so keep it cheap.
    widths = dict(pde_channels=8, depth_channels=8, rgb_channels=8, fusion_channels=8)
    cfg = DepthBranchConfig(query_mode=query_mode, fusion="he_init", **widths)
    model = DepthVLM.from_pretrained(base, depth_cfg=cfg, dtype=torch.float32)
    processor = DepthProcessor.from_pretrained(base)
    if query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    layout = chat_layout(model, processor.tokenizer)
    # Only the language model learns (the answer format and rough depths); the random he_init branch still injects
    # depth, and no backward pass runs through the vision tower.
    model.requires_grad_(False)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        rgb, gt = scene(48, 64, seed=step % 8)
        sparse = np.where(rng.random(gt.shape) < 0.3, gt, 0).astype(np.float32)
        inputs, input_ids, labels, segments, mm_types, pointers = _packed_example(
            processor, layout, rgb, sparse, gt, rng, k=12
        )
        positions, _ = packed_position_ids(model, input_ids, segments, mm_types, inputs["image_grid_thw"])
        logits = model(
            input_ids=input_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            depth_maps=inputs["depth_maps"],
            pointer_xy=torch.tensor(pointers, dtype=torch.float32) if pointers else None,
            position_ids=positions,
            attention_mask=block_attention_mask(segments),
        ).logits
        targets = labels[:, 1:]
        supervised = (targets != -100) & (segments[:, 1:] != PAD)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][supervised], targets[supervised])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
