"""Pointer query mode on the tiny checkpoint: the embedding at a pointer token is the projection of the visual
feature sampled at its pixel (checked against a hand-written bilinear interpolation), pixels stay distinguishable,
and the pointer projection is saved and loaded with the branch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm_depth.errors import ModelError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.finetune import apply_lora
from vlm_depth.model.pointer import add_pointer_token, init_pointer_embedding
from vlm_depth.model.processor import DepthProcessor

POINTER = DepthBranchConfig.pointer_token
CELL = 28  # pixels per merged token side (patch 14 x merge 2)


@pytest.fixture()
def processor(tiny_ckpt) -> DepthProcessor:
    return DepthProcessor.from_pretrained(tiny_ckpt)  # fresh per test: add_pointer_token changes the tokenizer


def _pointer_model(tiny_ckpt, processor: DepthProcessor, **cfg) -> DepthVLM:
    torch.manual_seed(0)
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=DepthBranchConfig(query_mode="pointer", **cfg))
    add_pointer_token(model, processor.tokenizer)
    return model.eval()


def _inputs(processor: DepthProcessor, sizes: list[tuple[int, int]], pointers_per_image: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    rgbs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    depths = [
        np.where(rng.random((h, w)) < 0.05, rng.uniform(0.5, 30.0, (h, w)), 0).astype(np.float32) for h, w in sizes
    ]
    texts = []
    for n in pointers_per_image:
        question = "Depth at " + " and ".join([POINTER] * n) + "?"
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        texts.append(processor.processor.apply_chat_template(messages, add_generation_prompt=True))
    return processor(rgbs, depths, text=texts)


def _language_model_inputs(model: DepthVLM, **inputs) -> torch.Tensor:
    """The inputs_embeds the language model receives in a forward of `model`."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0]


def _bilinear(features: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """features (h, w, hidden) sit at merged-cell centres; pixel (x, y) is at (x + 0.5, y + 0.5) px; edges clamp."""
    h, w, _ = features.shape
    u = min(max((x + 0.5) / CELL - 0.5, 0.0), w - 1)
    v = min(max((y + 0.5) / CELL - 0.5, 0.0), h - 1)
    j0, i0 = math.floor(u), math.floor(v)
    j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
    b, a = u - j0, v - i0
    return (
        (1 - a) * (1 - b) * features[i0, j0]
        + (1 - a) * b * features[i0, j1]
        + a * (1 - b) * features[i1, j0]
        + a * b * features[i1, j1]
    )


def _fourier(x: float, y: float, channels: int) -> torch.Tensor:
    """Per axis: sin then cos of 2 pi 2^k offset, k = 0 .. channels / 4 - 1; offset = position inside the cell."""
    out = []
    for coord in (x, y):
        offset = ((coord + 0.5) % CELL) / CELL
        angles = [2 * math.pi * 2**k * offset for k in range(channels // 4)]
        out += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    return torch.tensor(out)


def test_pointer_embedding_is_projection_of_feature_sampled_at_its_pixel(tiny_ckpt, processor):
    model = _pointer_model(tiny_ckpt, processor)
    with torch.no_grad():  # a non-identity projection, so the test also checks that the projection is applied
        model.depth_branch.pointer.feature_proj.weight.add_(
            0.05 * torch.randn_like(model.depth_branch.pointer.feature_proj.weight)
        )
    inputs = _inputs(processor, [(84, 112)], [3])  # grid 84x112 px -> 3x4 merged tokens
    xy = torch.tensor([[10.0, 20.0], [60.3, 47.0], [111.0, 83.0]])
    embeds = _language_model_inputs(model, **inputs, pointer_xy=xy)
    with torch.no_grad():
        grid = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"])
        features = grid.view(3, 4, -1)
        pointer = model.depth_branch.pointer
        expected = torch.stack(
            [
                pointer.feature_proj(_bilinear(features, x, y))
                + pointer.offset_proj.weight @ _fourier(x, y, model.depth_cfg.pointer_fourier)
                for x, y in xy.tolist()
            ]
        )
    got = embeds[inputs["input_ids"] == model.pointer_token_id]
    assert got.shape == expected.shape == (3, model.config.text_config.hidden_size)
    assert (got - expected).abs().max().item() <= 1e-5
    # Everything else is the ordinary input: image features in the placeholders, token embeddings elsewhere.
    image = inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(embeds[image], grid)
    text = ~image & (inputs["input_ids"] != model.pointer_token_id)
    assert torch.equal(embeds[text], model.get_input_embeddings()(inputs["input_ids"])[text].detach())


def test_pointers_at_different_pixels_get_different_embeddings(tiny_ckpt, processor):
    model = _pointer_model(tiny_ckpt, processor)
    inputs = _inputs(processor, [(84, 112)], [4])
    # (1, 1) and (5, 5) both sample the corner token exactly (border clamp); only the sub-cell offset tells them apart.
    xy = torch.tensor([[1.0, 1.0], [5.0, 5.0], [40.0, 30.0], [41.0, 30.0]])
    got = _language_model_inputs(model, **inputs, pointer_xy=xy)[inputs["input_ids"] == model.pointer_token_id]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (got[i] - got[j]).abs().max().item() > 1e-4, (i, j)


def test_pointer_image_index_defaults_to_the_image_before_the_pointer(tiny_ckpt, processor):
    model = _pointer_model(tiny_ckpt, processor)
    inputs = _inputs(processor, [(48, 64), (84, 112)], [1, 2])
    xy = torch.tensor([[10.0, 10.0], [50.0, 30.0], [20.0, 50.0]])
    inferred = _language_model_inputs(model, **inputs, pointer_xy=xy)
    explicit = _language_model_inputs(model, **inputs, pointer_xy=xy, pointer_image_index=torch.tensor([0, 1, 1]))
    swapped = _language_model_inputs(model, **inputs, pointer_xy=xy, pointer_image_index=torch.tensor([1, 0, 0]))
    mask = inputs["input_ids"] == model.pointer_token_id
    assert torch.equal(inferred, explicit)
    assert not torch.allclose(inferred[mask], swapped[mask])


def test_pointer_input_errors_are_model_errors(tiny_ckpt, processor):
    model = _pointer_model(tiny_ckpt, processor)
    inputs = _inputs(processor, [(48, 64)], [2])  # grid 56x56
    with pytest.raises(ModelError, match="2 pointer tokens but pointer_xy has 1"):
        model(**inputs, pointer_xy=torch.tensor([[1.0, 1.0]]))
    with pytest.raises(ModelError, match="no pointer_xy"):
        model(**{k: v for k, v in inputs.items() if k != "depth_maps"})
    with pytest.raises(ModelError, match="outside"):
        model(**inputs, pointer_xy=torch.tensor([[1.0, 1.0], [55.6, 3.0]]))


def test_add_pointer_token_mean_initialises_its_rows(tiny_ckpt, processor):
    torch.manual_seed(0)
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=DepthBranchConfig(query_mode="pointer"))
    before = len(processor.tokenizer)
    token_id = add_pointer_token(model, processor.tokenizer)
    assert token_id == before and processor.tokenizer.convert_ids_to_tokens(token_id) == POINTER
    assert add_pointer_token(model, processor.tokenizer) == token_id
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert torch.allclose(weight[token_id], weight[:token_id].mean(0), atol=1e-7)
    # A token id beyond the vocabulary grows both matrices; every new row is the mean of the old ones.
    vocab = model.get_input_embeddings().num_embeddings
    init_pointer_embedding(model, vocab + 2)
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert weight.shape[0] == vocab + 3
        assert torch.allclose(weight[vocab:], weight[:vocab].mean(0).expand(3, -1), atol=1e-7)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_pointer_projection_is_saved_and_loaded(tiny_ckpt, processor, tmp_path, variant):
    model = _pointer_model(tiny_ckpt, processor, fusion="he_init")
    if variant == "lora":
        apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for param in model.depth_branch.pointer.parameters():
            param.add_(0.01 * torch.randn_like(param))
    inputs = _inputs(processor, [(84, 112)], [2])
    xy = torch.tensor([[10.0, 20.0], [70.0, 50.0]])
    with torch.no_grad():
        expected = model(**inputs, pointer_xy=xy).logits
    model.save_pretrained(tmp_path)
    loaded = DepthVLM.from_pretrained(tmp_path, base_model=str(tiny_ckpt)).eval()  # LoRA: its base passed
    assert loaded.pointer_token_id == model.pointer_token_id
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, pointer_xy=xy).logits, expected)


def test_generate_with_pointers_equals_manual_greedy_loop(tiny_ckpt, processor):
    model = _pointer_model(tiny_ckpt, processor, fusion="he_init")
    inputs = _inputs(processor, [(48, 64)], [2])
    xy = torch.tensor([[10.0, 20.0], [40.0, 50.0]])
    new_tokens = 4
    with torch.no_grad():
        generated = model.generate(
            **inputs, pointer_xy=xy, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[]
        )
        ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        for _ in range(new_tokens):
            extra = ids.shape[1] - types.shape[1]
            step = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), pointer_xy=xy)
            step["mm_token_type_ids"] = torch.cat([types, torch.zeros(1, extra, dtype=types.dtype)], dim=1)
            ids = torch.cat([ids, model(**step).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
