"""DepthVLM on the offline tiny checkpoint: zero-init identity, locality of the injection, the precomputed-embeddings
path the collator and decoder use, generate, training updates, save/load and parameter groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vlm_depth.errors import ModelError
from vlm_depth.model.align import patchify, split_maps
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.finetune import apply_lora, trainable_parameter_groups
from vlm_depth.model.patch_embed import DepthPatchEmbed
from vlm_depth.model.processor import DepthProcessor

PROMPT = "The pixel at (x, y) = (12, 34) is"


def _sparse_depth(rng: np.random.Generator, height: int, width: int, density: float = 0.05) -> np.ndarray:
    depth = np.zeros((height, width), np.float32)
    keep = rng.random((height, width)) < density
    depth[keep] = rng.uniform(0.3, 60.0, keep.sum())
    return depth


def _chat(processor: DepthProcessor, n_images: int = 1, text: str = PROMPT) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def processor(tiny_ckpt) -> DepthProcessor:
    return DepthProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def inputs(processor):
    """One 64x48 RGB image with 5 % sparse depth, as model inputs."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return processor(rgb, _sparse_depth(rng, 48, 64), text=_chat(processor))


@pytest.fixture(scope="module")
def batch_inputs(processor):
    """Two images of different sizes in two sequences (padded), each with its own sparse depth."""
    rng = np.random.default_rng(1)
    rgbs = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)]
    depths = [_sparse_depth(rng, 48, 64), _sparse_depth(rng, 70, 90)]
    return processor(rgbs, depths, text=[_chat(processor), _chat(processor, text="Depth?")])


def _load(tiny_ckpt, **cfg) -> DepthVLM:
    return DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=DepthBranchConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def he_model(tiny_ckpt) -> DepthVLM:
    """A branch that is not a no-op at init, so depth visibly changes the outputs."""
    torch.manual_seed(0)
    return _load(tiny_ckpt, fusion="he_init")


@pytest.mark.parametrize("fusion,patch_embed_init", [("soft", "copy"), ("soft", "shared"), ("hard_concat", "copy")])
def test_fresh_branch_leaves_logits_unchanged(tiny_ckpt, batch_inputs, fusion, patch_embed_init):
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    model = _load(tiny_ckpt, fusion=fusion, patch_embed_init=patch_embed_init)
    plain = {k: v for k, v in batch_inputs.items() if k != "depth_maps"}
    with torch.no_grad():
        expected = base(**plain).logits
        got = model(**batch_inputs).logits
    assert batch_inputs["depth_maps"].gt(0).any()
    assert (got - expected).abs().max().item() <= 1e-6


def test_he_init_branch_changes_logits(tiny_ckpt, he_model, batch_inputs):
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    plain = {k: v for k, v in batch_inputs.items() if k != "depth_maps"}
    with torch.no_grad():
        diff = (he_model(**batch_inputs).logits - base(**plain).logits).abs().max().item()
    assert diff > 1e-3


def test_without_depth_values_the_model_is_the_base_model(tiny_ckpt, he_model, inputs):
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    plain = {k: v for k, v in inputs.items() if k != "depth_maps"}
    with torch.no_grad():
        assert torch.equal(he_model(**plain).logits, base(**plain).logits)


@pytest.mark.parametrize("fusion", ["he_init", "hard_concat"])
def test_depth_at_patch_centre_changes_only_that_patch_embedding(tiny_ckpt, processor, fusion):
    torch.manual_seed(0)
    model = _load(tiny_ckpt, fusion=fusion)
    if fusion == "hard_concat":  # its extra input channels start at zero; give them weights to see anything
        torch.nn.init.normal_(model.depth_patch_embed.depth_proj.weight, std=0.05)
    rgb = np.random.default_rng(2).integers(0, 256, (56, 84, 3), dtype=np.uint8)  # already on the 56x84 grid
    one_point = np.zeros((56, 84), np.float32)
    one_point[14 + 7, 28 + 7] = 3.5  # centre of the patch in patch-row 1, patch-column 2
    captured = []
    hook = model.model.visual.patch_embed.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    with torch.no_grad():
        for depth in (np.zeros_like(one_point), one_point):
            x = processor(rgb, depth, text=_chat(processor))
            model.encode_images(x["pixel_values"], x["image_grid_thw"], x["depth_maps"])
    hook.remove()
    assert tuple(x["image_grid_thw"][0].tolist()) == (1, 4, 6)
    (depth_map,) = split_maps(x["depth_maps"], x["image_grid_thw"], 14)
    depth_rows = patchify(depth_map[None, None], 14, 2, 2).gt(0).any(dim=1).nonzero().flatten().tolist()
    changed = (captured[1] - captured[0]).abs().amax(dim=1).gt(0).nonzero().flatten().tolist()
    assert len(depth_rows) == 1
    assert changed == depth_rows


def test_precomputed_embeddings_with_rope_index_and_4d_mask_match_forward(he_model, batch_inputs):
    ids, grid = batch_inputs["input_ids"], batch_inputs["image_grid_thw"]
    mask2d = batch_inputs["attention_mask"]
    with torch.no_grad():
        expected = he_model(**batch_inputs).logits
        embeds = he_model.embed_inputs(
            ids, he_model.encode_images(batch_inputs["pixel_values"], grid, batch_inputs["depth_maps"])
        )
        position_ids = he_model.model.get_rope_index(
            ids, batch_inputs["mm_token_type_ids"], image_grid_thw=grid, attention_mask=mask2d
        )[0]
        got = he_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask2d).logits
        # The same with an explicit additive 4-D mask (causal, padding blocked; padded rows see themselves).
        length = ids.shape[1]
        allowed = torch.ones(length, length).tril().bool()[None] & mask2d.bool()[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]
        mask4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        got4d = he_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask4d).logits
        # And split at a cached prefix: the tail sees the prefix through past_key_values.
        cut = length - 5
        prefix = he_model(
            inputs_embeds=embeds[:, :cut],
            position_ids=position_ids[..., :cut],
            attention_mask=mask4d[..., :cut, :cut],
            use_cache=True,
        )
        tail = he_model(
            inputs_embeds=embeds[:, cut:],
            position_ids=position_ids[..., cut:],
            attention_mask=mask4d[..., cut:, :],
            past_key_values=prefix.past_key_values,
            use_cache=True,
        ).logits
    real = mask2d.bool()
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got4d - expected)[real].abs().max().item() <= 1e-5
    assert (tail - expected[:, cut:])[real[:, cut:]].abs().max().item() <= 1e-5


def test_generate_with_depth_equals_manual_greedy_loop(he_model, inputs):
    new_tokens = 6
    with torch.no_grad():
        generated = he_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        for _ in range(new_tokens):
            extra = ids.shape[1] - inputs["input_ids"].shape[1]
            step = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
            step["mm_token_type_ids"] = torch.cat([types, torch.zeros(1, extra, dtype=types.dtype)], dim=1)
            next_id = he_model(**step).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert generated.shape == ids.shape
    assert torch.equal(generated, ids)


def test_one_optimizer_step_updates_branch_and_lora_not_base(tiny_ckpt, inputs):
    model = apply_lora(_load(tiny_ckpt), r=4, alpha=8, dropout=0.0).train()
    groups = trainable_parameter_groups(model)
    optimizer = torch.optim.AdamW([{"params": groups["branch"]}, {"params": groups["backbone"]}], lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step() -> None:
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()

    def changed() -> set[str]:
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    trainable = {names[id(p)] for group in groups.values() for p in group}
    step()
    # Step 0 of a zero-init branch: only the final fusion conv and LoRA's B (both behind nothing zero) get gradient.
    lora_b = {n for n in trainable if "lora_B" in n}
    assert {"depth_branch.fusion.out.weight", "depth_branch.fusion.out.bias"} | lora_b <= changed() <= trainable
    step()
    assert changed() == trainable  # every branch and LoRA tensor moves once the zero layers have moved
    assert any(n.startswith("depth_branch.") for n in trainable)
    assert "model.visual.patch_embed.depth_proj.weight" in trainable
    assert not any(n.startswith("model.language_model") and "lora" not in n for n in trainable)


def test_parameter_groups_split_branch_from_backbone(tiny_ckpt):
    full = _load(tiny_ckpt, query_mode="pointer")
    groups = trainable_parameter_groups(full)
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    branch = {id(p) for p in full.depth_branch.parameters()} | {id(full.depth_patch_embed.depth_proj.weight)}
    assert ids["branch"] == branch
    assert ids["backbone"] == {id(p) for p in full.parameters()} - branch
    lora = apply_lora(_load(tiny_ckpt), vision=True)
    names = {id(p): n for n, p in lora.named_parameters()}
    backbone = {names[id(p)] for p in trainable_parameter_groups(lora)["backbone"]}
    assert backbone and all("lora_" in n for n in backbone)
    assert any(n.startswith("model.visual.blocks.") for n in backbone)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_save_then_load_gives_identical_logits(tiny_ckpt, tmp_path, batch_inputs, variant):
    torch.manual_seed(0)
    model = _load(tiny_ckpt, fusion="he_init")
    if variant == "lora":
        apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # move every kind of weight away from what a fresh load would give
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.eval()
    with torch.no_grad():
        expected = model(**batch_inputs).logits
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    if variant == "lora":
        assert json.loads((tmp_path / "base_model.json").read_text())["base_model"] == str(tiny_ckpt.resolve())
        assert not (tmp_path / "model.safetensors").exists()
    loaded = DepthVLM.from_pretrained(tmp_path, base_model=str(tiny_ckpt)).eval()  # LoRA: its base passed
    assert loaded.depth_cfg == model.depth_cfg
    with torch.no_grad():
        got = loaded(**batch_inputs).logits
    assert torch.equal(got, expected)


def test_a_lora_checkpoint_loads_with_peft_as_the_base_plus_its_adapter(tiny_ckpt, tmp_path, batch_inputs):
    from peft import PeftModel

    torch.manual_seed(0)
    model = apply_lora(_load(tiny_ckpt), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["base_model_name_or_path"] == str(tiny_ckpt.resolve())
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(adapter["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    plain = {k: v for k, v in batch_inputs.items() if k != "depth_maps"}  # peft knows no depth branch
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**plain).logits, model.eval()(**plain).logits, rtol=0, atol=1e-5)


def test_full_checkpoint_base_weights_load_as_plain_qwen(tiny_ckpt, tmp_path):
    model = _load(tiny_ckpt, fusion="he_init")
    with torch.no_grad():
        model.depth_patch_embed.base_layer.proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert isinstance(model.model.visual.patch_embed, DepthPatchEmbed)
    assert torch.equal(plain.model.visual.patch_embed.proj.weight, model.depth_patch_embed.base_layer.proj.weight)
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_loading_a_plain_checkpoint_attaches_a_fresh_branch(tiny_ckpt):
    model = DepthVLM.from_pretrained(tiny_ckpt)
    assert model.depth_cfg == DepthBranchConfig()
    assert torch.equal(model.depth_branch.fusion.out.weight, torch.zeros_like(model.depth_branch.fusion.out.weight))
    native = model.depth_patch_embed.base_layer.proj.weight
    assert torch.equal(model.depth_patch_embed.depth_proj.weight, native) and native.abs().sum() > 0


def test_unreadable_folder_is_a_one_line_model_error(tmp_path):
    with pytest.raises(ModelError, match="no_such_checkpoint: checkpoint folder not found") as err:
        DepthVLM.from_pretrained(tmp_path / "no_such_checkpoint")
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="broken") as err:
        DepthVLM.from_pretrained(broken)
    assert "\n" not in str(err.value)
