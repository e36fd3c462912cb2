"""Packed query blocks give the same logits and losses as one query per sequence (the paper's setting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from vlm_depth.model.packing import PAD, PREFIX, block_attention_mask, block_offsets, packed_position_ids


@pytest.fixture(scope="module")
def base(tiny_ckpt):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_ckpt)


def _prefix_and_blocks(processor, size, k, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Depth."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=False).removesuffix("<|im_end|>\n")
    enc = processor(text=[text], images=[image], return_tensors="pt")
    tok = processor.tokenizer
    blocks = []
    for _ in range(k):
        x, y, d = rng.integers(0, 99), rng.integers(0, 99), rng.uniform(0.5, 20)
        query = f" ({x}, {y}) What is the distance?<|im_end|>\n<|im_start|>assistant\nThe pixel is {d:.3f} meters."
        blocks.append(torch.tensor(tok(query, add_special_tokens=False)["input_ids"]))
    return enc, blocks


def _pack(encs, blocks_per_image, pad_id, image_token_id):
    rows, segs = [], []
    for enc, blocks in zip(encs, blocks_per_image):
        ids = [enc["input_ids"][0]] + blocks
        rows.append(torch.cat(ids))
        segs.append(torch.cat([torch.full((len(t),), s, dtype=torch.long) for s, t in enumerate(ids)]))
    length = max(len(r) for r in rows)
    input_ids = torch.stack([torch.nn.functional.pad(r, (0, length - len(r)), value=pad_id) for r in rows])
    segment_ids = torch.stack([torch.nn.functional.pad(s, (0, length - len(s)), value=PAD) for s in segs])
    return input_ids, segment_ids, (input_ids == image_token_id).int()


@pytest.mark.parametrize("k", [1, 3, 16])
def test_packed_blocks_match_separate_sequences(base, k):
    model, processor = base
    sizes = [(64, 48), (90, 70)]
    data = [_prefix_and_blocks(processor, s, k, seed=i + k) for i, s in enumerate(sizes)]
    encs, blocks = [d[0] for d in data], [d[1] for d in data]
    input_ids, segment_ids, mm_types = _pack(
        encs, blocks, processor.tokenizer.pad_token_id, model.config.image_token_id
    )
    pixel_values = torch.cat([e["pixel_values"] for e in encs])
    grid = torch.cat([e["image_grid_thw"] for e in encs])
    positions, _ = packed_position_ids(model, input_ids, segment_ids, mm_types, grid)
    with torch.no_grad():
        packed = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            position_ids=positions,
            attention_mask=block_attention_mask(segment_ids),
        ).logits
    for b, (enc, blocks_b) in enumerate(zip(encs, blocks)):
        for s, block in enumerate(blocks_b, start=1):
            single_ids = torch.cat([enc["input_ids"][0], block])[None]
            with torch.no_grad():
                single = model(
                    input_ids=single_ids,
                    pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                    mm_token_type_ids=(single_ids == model.config.image_token_id).int(),
                ).logits[0, -len(block) :]
            got = packed[b, segment_ids[b] == s]
            torch.testing.assert_close(got, single, atol=1e-4, rtol=0)
            loss_single = torch.nn.functional.cross_entropy(single[:-1], block[1:])
            loss_packed = torch.nn.functional.cross_entropy(got[:-1], block[1:])
            assert abs(loss_single.item() - loss_packed.item()) <= 1e-4


def test_mask_blocks_see_prefix_and_themselves_only():
    seg = torch.tensor([[PREFIX, PREFIX, 1, 1, 2, 2, PAD]])
    allowed = block_attention_mask(seg)[0, 0] == 0
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]
    assert allowed[6].tolist() == [False] * 6 + [True]
    assert block_offsets(seg)[0, :6].tolist() == [0, 1, 0, 1, 0, 1]
    # incremental rows (a KV cache): the last two tokens only
    assert torch.equal(block_attention_mask(seg, num_new=2), block_attention_mask(seg)[:, :, -2:])
