"""4-bit (bitsandbytes NF4) DepthVLM on CPU: what is quantized, zero-init identity, forward close to fp32, LoRA
training in any order after evaluation, adapter save/load, and clear errors for what is not supported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.finetune import apply_lora
from vlm_depth.model.processor import DepthProcessor

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def inputs(tiny_ckpt):
    processor = DepthProcessor.from_pretrained(tiny_ckpt)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    depth = np.where(rng.random((48, 64)) < 0.05, rng.uniform(0.5, 30.0, (48, 64)), 0).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Depth at (3, 4)?"}]}]
    return processor(rgb, depth, text=processor.processor.apply_chat_template(messages, add_generation_prompt=True))


def test_nf4_quantizes_the_language_model_only(tiny_ckpt):
    model = DepthVLM.from_pretrained(tiny_ckpt, quantization="nf4")
    lm_linears = [m for n, m in model.named_modules() if n.startswith("model.language_model") and "proj" in n]
    assert lm_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in lm_linears)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual.modules())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert all(p.dtype == torch.float32 for p in model.depth_branch.parameters())
    assert model.depth_patch_embed.depth_proj.weight.dtype == torch.float32


def test_nf4_forward_keeps_zero_init_identity_and_tracks_fp32(tiny_ckpt, inputs):
    quantized = DepthVLM.from_pretrained(tiny_ckpt, quantization="nf4").eval()
    full = DepthVLM.from_pretrained(tiny_ckpt).eval()
    plain = {k: v for k, v in inputs.items() if k != "depth_maps"}
    with torch.no_grad():
        with_depth = quantized(**inputs).logits
        without_depth = quantized(**plain).logits
        reference = full(**inputs).logits
    assert torch.isfinite(with_depth).all()
    assert (with_depth - without_depth).abs().max().item() <= 1e-6
    # NF4 rounding moves the logits of this random tiny model (measured max |diff| ~0.16 of max |logit| ~0.97),
    # but they stay strongly aligned with the fp32 model's.
    cosine = torch.nn.functional.cosine_similarity(with_depth.flatten(), reference.flatten(), dim=0).item()
    assert cosine > 0.95


def test_nf4_lora_trains_after_an_evaluation_and_reloads(tiny_ckpt, inputs, tmp_path):
    model = DepthVLM.from_pretrained(tiny_ckpt, quantization="nf4").eval()
    with torch.no_grad():
        model(**inputs)  # an eval forward first: bitsandbytes' CPU repacking must not break training afterwards
    apply_lora(model, r=4, alpha=8, dropout=0.0).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values())
    assert model.depth_branch.fusion.out.weight.grad.abs().sum() > 0
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = DepthVLM.from_pretrained(tmp_path, quantization="nf4", base_model=str(tiny_ckpt)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_nf4_full_weights_cannot_be_saved(tiny_ckpt, tmp_path):
    model = DepthVLM.from_pretrained(tiny_ckpt, quantization="nf4")
    with pytest.raises(ModelError, match="LoRA adapter only"):
        model.save_pretrained(tmp_path)


def test_unknown_quantization_is_a_config_error(tiny_ckpt):
    with pytest.raises(ConfigError, match="nf4"):
        DepthVLM.from_pretrained(tiny_ckpt, quantization="int3", depth_cfg=DepthBranchConfig())
