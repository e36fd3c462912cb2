"""The offline tiny checkpoint loads through the standard Hugging Face entry points and behaves like Qwen2.5-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from vlm_depth.cli import main as cli_main


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    return model, processor


def _chat_inputs(processor, size=(64, 48)):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How far is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def test_every_digit_and_decimal_point_is_a_single_token(loaded):
    tokenizer = loaded[1].tokenizer
    for char in "0123456789.":
        assert len(tokenizer(char, add_special_tokens=False)["input_ids"]) == 1, char
    ids = tokenizer("The pixel is 12.345 meters away", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ["1", "2", ".", "3", "4", "5"] == [t for t in tokens if t in set("0123456789.")]


def test_qwen_special_tokens_exist_and_ids_are_consistent(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    for name in [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<|endoftext|>",
    ]:
        assert tok.convert_tokens_to_ids(name) is not None
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    assert model.config.text_config.pad_token_id == tok.pad_token_id
    assert len(tok) <= model.config.text_config.vocab_size


def test_processor_produces_pixel_values_and_grid(loaded):
    _, processor = loaded
    inputs = _chat_inputs(processor, size=(100, 70))
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert inputs["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)
    n_image_tokens = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_image_tokens == h * w // 4


def test_forward_and_generate_run(loaded):
    model, processor = loaded
    inputs = _chat_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tiny_cli_is_deterministic_by_seed(tmp_path):
    from safetensors.torch import load_file

    assert cli_main(["tiny", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(["tiny", "--out", str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "vlm_depth_tiny.yaml").is_file()
