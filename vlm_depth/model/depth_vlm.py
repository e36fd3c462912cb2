"""DepthVLM: Qwen2.5-VL with VLM-DC's visual depth injection, `E = F_e1(I) + F_e2(O)`, and the pointer query mode.

Per image, the processor's `pixel_values` (unpatchified to the resized grid) and its depth map (`depth_maps`, on the
same grid) go through DepthFusion to O (B, 3, H', W'); O is patchified in the processor's order and F_e2 (a second
patch embedding, `DepthPatchEmbed`) adds its embedding to the native patch tokens inside the vision tower. With a fresh
`soft` branch O is exactly 0, so the model is exactly the base model. `hard_concat` instead feeds the encoded depth
to zero-initialised extra input channels of the patch embedding.

Everything vlm-depth adds lives under `depth_branch` (DepthFusion, PointerEncoder, MDM head) plus F_e2's own
Conv3d beside the native one at `model.visual.patch_embed.depth_proj`; `is_branch_key` names them. They are saved to
`depth_branch.safetensors`, apart from the Qwen2.5-VL weights (or LoRA adapter), so the base weights of a full
fine-tune remain an ordinary Qwen2.5-VL checkpoint.

The checkpoint folder format (`save_pretrained` / `from_pretrained`) is `vlm_depth.model.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.model.align import patchify, split_maps, unpatchify
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.checkpoint import BRANCH_FILE, load_depth_vlm, load_exact_state, save_depth_vlm
from vlm_depth.model.encodings import depth_features, encoded_channels
from vlm_depth.model.fusion import DepthFusion
from vlm_depth.model.mdm_head import MDM_HEAD_FIELDS, MDMHead, build_mdm_head, mdm_depth
from vlm_depth.model.patch_embed import DepthPatchEmbed, wrap_patch_embed
from vlm_depth.model.pointer import PointerEncoder, infer_pointer_image_index, sample_pointer_features

BRANCH_PREFIXES = ("depth_branch.", "model.visual.patch_embed.depth_proj.")
WRAPPED_PATCH_EMBED = ".patch_embed.base_layer."


# Hugging Face looks up checkpoint key renames (original Qwen2.5-VL layout <-> transformers 5 modules) by class name;
# registering DepthVLM under Qwen2.5-VL's mapping makes it load and save base weights exactly as Qwen2.5-VL does.
register_checkpoint_conversion_mapping(
    "DepthVLM", get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"), overwrite=True
)


def is_branch_key(name: str) -> bool:
    """True for parameter / buffer names of the depth branch (fusion, F_e2, pointer, heads)."""
    return name.startswith(BRANCH_PREFIXES)


class DepthBranch(nn.Module):
    """The modules vlm-depth adds to Qwen2.5-VL (F_e2's Conv3d lives in the wrapped patch embedding)."""

    def __init__(self, cfg: DepthBranchConfig, hidden_size: int, init_std: float, vision_config):
        super().__init__()
        self.fusion = None if cfg.fusion == "hard_concat" else DepthFusion(cfg)
        self.pointer = (
            PointerEncoder(hidden_size, cfg.pointer_fourier, init_std) if cfg.query_mode == "pointer" else None
        )
        self.mdm_head = build_mdm_head(cfg, vision_config) if cfg.mdm_head else None


class DepthVLM(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose `forward`/`generate` also take `depth_maps` (on the grids of `pixel_values`, meters) and, in
    pointer mode, `pointer_xy`. Without them it computes exactly what Qwen2.5-VL computes."""

    def __init__(self, config, depth_cfg: DepthBranchConfig | None = None):
        super().__init__(config)
        self.depth_cfg: DepthBranchConfig | None = None
        self.depth_branch: DepthBranch | None = None
        if depth_cfg is not None:
            self.attach_depth_branch(depth_cfg)

    # ------------------------------------------------------------------ construction
    def attach_depth_branch(self, depth_cfg: DepthBranchConfig) -> None:
        """Build a fresh depth branch (initialised per `depth_cfg`) and wrap the vision tower's patch embedding."""
        if self.depth_branch is not None:
            raise ModelError("this model already has a depth branch")
        if depth_cfg.fusion not in ("soft", "he_init", "hard_concat"):
            raise ConfigError(f"unknown fusion {depth_cfg.fusion!r}; choose soft, he_init or hard_concat")
        device = self.get_input_embeddings().weight.device
        self.depth_cfg = depth_cfg
        text = self.config.get_text_config()
        self.depth_branch = DepthBranch(
            depth_cfg, text.hidden_size, text.initializer_range, self.config.vision_config
        ).to(device)
        if depth_cfg.fusion == "hard_concat":
            wrap_patch_embed(self.model.visual, "zero", encoded_channels(depth_cfg))
        else:
            wrap_patch_embed(self.model.visual, depth_cfg.patch_embed_init)

    @property
    def depth_patch_embed(self) -> DepthPatchEmbed:
        """The wrapped patch embedding (F_e1 = `base_layer`, F_e2 = `proj`)."""
        patch_embed = self.model.visual.patch_embed
        if not isinstance(patch_embed, DepthPatchEmbed):
            raise ModelError("no depth branch attached (use DepthVLM.from_pretrained or attach_depth_branch)")
        return patch_embed

    @property
    def pointer_token_id(self) -> int | None:
        """Token id of the pointer token (set by `add_pointer_token`, saved in config.json / base_model.json)."""
        return getattr(self.config, "pointer_token_id", None)

    @property
    def mdm_head(self) -> MDMHead:
        """The MDM head (`depth_cfg.mdm_head`); ModelError when the model has none."""
        head = None if self.depth_branch is None else self.depth_branch.mdm_head
        if head is None:
            raise ModelError("this model has no MDM head (train one with mdm_mode head_only or joint)")
        return head

    def attach_mdm_head(self, cfg: DepthBranchConfig) -> None:
        """Add a fresh MDM head built from the `mdm_*` fields of `cfg` to the existing depth branch (e.g. to train
        a head on a checkpoint trained without one); `depth_cfg` records it, so it is saved and restored."""
        if self.depth_branch is None or self.depth_branch.mdm_head is not None:
            raise ModelError("attach_mdm_head needs a depth branch without an MDM head")
        fields = {k: getattr(cfg, k) for k in MDM_HEAD_FIELDS}
        self.depth_cfg = dataclasses.replace(self.depth_cfg, mdm_head=True, **fields)
        device = self.get_input_embeddings().weight.device
        self.depth_branch.mdm_head = build_mdm_head(self.depth_cfg, self.config.vision_config).to(device)

    # ------------------------------------------------------------------ depth injection
    def depth_patches(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, depth_maps: torch.Tensor
    ) -> torch.Tensor:
        """Depth-branch patches (rows aligned with `pixel_values`) for F_e2: O (soft / he_init) or the encoded
        depth (hard_concat), computed on the maps and patchified once, in the processor's order.

        pixel_values: (N, 3 * T * 14 * 14) processor output; depth_maps: the processor's flat per-image maps in
        meters, 0 = missing (`vlm_depth.model.align.split_maps`).
        """
        vision = self.config.vision_config
        shape = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        try:
            depths = split_maps(depth_maps.float(), image_grid_thw, vision.patch_size)
        except ValueError as err:
            raise ModelError(f"depth_maps do not fit the images of pixel_values: {err}") from err
        if self.depth_cfg.fusion == "hard_concat":
            outputs = [depth_features(d[None, None], self.depth_cfg) for d in depths]
        else:
            rgbs = unpatchify(pixel_values, image_grid_thw, 3, *shape)
            outputs: list[torch.Tensor | None] = [None] * len(depths)
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, depth in enumerate(depths):
                by_size.setdefault(tuple(depth.shape), []).append(i)
            for members in by_size.values():  # one batch per image size: one BatchNorm batch, one conv call
                fused = self.depth_branch.fusion(
                    torch.stack([rgbs[i] for i in members]), torch.stack([depths[i][None] for i in members])
                )
                for i, o in zip(members, fused):
                    outputs[i] = o[None]
        return torch.cat([patchify(o, *shape) for o in outputs])

    def encode_images(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, depth_maps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision tower + depth injection + merger: the (n_merged_tokens_total, hidden) features that fill the
        `<|image_pad|>` placeholders, images in order. `depth_maps=None`: no injection (the base model's
        features)."""
        return self.vision_outputs(pixel_values, image_grid_thw, depth_maps).pooler_output

    def vision_outputs(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, depth_maps: torch.Tensor | None = None
    ):
        """The vision tower's output with depth injection: `pooler_output` (merged tokens, as `encode_images`) and
        `last_hidden_state` (14-px patch tokens before the merger, in the tower's window order)."""
        patches = None if depth_maps is None else self.depth_patches(pixel_values, image_grid_thw, depth_maps)
        visual = self.model.visual
        with self.depth_patch_embed.injecting(patches):
            return visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)

    def mdm_depth(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        depth_maps: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        out_sizes: list[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor]:
        """MDM readout: one dense (H, W) depth map in meters per image (see `vlm_depth.model.mdm_head.mdm_depth`;
        `patch_mask` hides 14-px patches' depth, `out_sizes` defaults to the processor's grid)."""
        return mdm_depth(self, pixel_values, image_grid_thw, depth_maps, patch_mask, out_sizes)

    # ------------------------------------------------------------------ pointer mode
    def pointer_embeddings(
        self,
        image_embeds: torch.Tensor,
        image_grid_thw: torch.Tensor,
        pointer_xy: torch.Tensor,
        pointer_image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Input embeddings (n, hidden) of n pointer tokens at pixels `pointer_xy` (n, 2) (x, y) on the resized grid
        of images `pointer_image_index` (n,), from the merged features `image_embeds` of `encode_images`."""
        if self.depth_branch is None or self.depth_branch.pointer is None:
            raise ModelError("pointer_xy given but the model is not in pointer mode (depth_cfg.query_mode)")
        vision = self.config.vision_config
        features, offsets = sample_pointer_features(
            image_embeds,
            image_grid_thw,
            pointer_xy,
            pointer_image_index,
            vision.patch_size,
            vision.spatial_merge_size,
        )
        return self.depth_branch.pointer(features, offsets)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        pointer_xy: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pointer_image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings (B, L, hidden) for `input_ids` (B, L): token embeddings, image features scattered into the
        `<|image_pad|>` placeholders (when `input_ids` hold any; then their count must match `image_embeds`), and, in
        pointer mode, pointer tokens replaced (in flattened order) by `pointer_embeddings`. `image_embeds` also serves
        as the pointers' source when `input_ids` hold queries only (cached prefix). `pointer_image_index` defaults to
        the image that last started before each pointer (or image 0 when there is one image)."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        n_placeholders = int(image_mask.sum())
        if n_placeholders:
            if image_embeds is None or image_embeds.shape[0] != n_placeholders:
                got = None if image_embeds is None else image_embeds.shape[0]
                raise ModelError(f"input_ids hold {n_placeholders} image placeholders but image_embeds has {got} rows")
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.device, embeds.dtype))
        token_id = self.pointer_token_id
        pointer_mask = input_ids == token_id if token_id is not None else torch.zeros_like(image_mask)
        n_pointers = int(pointer_mask.sum())
        if pointer_xy is None:
            if n_pointers and n_placeholders:
                raise ModelError(f"input_ids hold {n_pointers} pointer tokens but no pointer_xy was given")
            return embeds
        if token_id is None:
            raise ModelError("pointer_xy given but the model has no pointer token; call add_pointer_token first")
        if n_pointers != pointer_xy.shape[0]:
            raise ModelError(
                f"input_ids hold {n_pointers} pointer tokens but pointer_xy has {pointer_xy.shape[0]} rows"
            )
        if image_embeds is None or image_grid_thw is None:
            raise ModelError("pointer tokens need image_embeds and image_grid_thw")
        if pointer_image_index is None:
            if image_grid_thw.shape[0] == 1:
                pointer_image_index = torch.zeros(n_pointers, dtype=torch.long, device=input_ids.device)
            else:
                pointer_image_index = infer_pointer_image_index(
                    input_ids, self.config.vision_start_token_id, self.config.image_token_id, token_id
                )
        values = self.pointer_embeddings(image_embeds, image_grid_thw, pointer_xy, pointer_image_index)
        return embeds.masked_scatter(pointer_mask[..., None], values.to(embeds.device, embeds.dtype))

    # ------------------------------------------------------------------ forward / generate
    def _branch_inputs_embeds(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        depth_maps: torch.Tensor | None,
        pointer_xy: torch.Tensor | None,
        pointer_image_index: torch.Tensor | None,
    ) -> torch.Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise ModelError("depth_maps / pointer_xy need input_ids (not inputs_embeds; see embed_inputs)")
        if depth_maps is not None and pixel_values is None:
            raise ModelError("depth_maps given without pixel_values")
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, image_grid_thw, depth_maps)
        return self.embed_inputs(input_ids, image_embeds, pointer_xy, image_grid_thw, pointer_image_index)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, Any] | None = None,
        depth_maps: torch.Tensor | None = None,
        pointer_xy: torch.Tensor | None = None,
        pointer_image_index: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Qwen2.5-VL's forward (generation inspects its signature, hence the full list), plus `depth_maps` (the
        processor's per-image maps, meters), and in pointer mode `pointer_xy` (n, 2) / `pointer_image_index` (n,).
        Precomputed `inputs_embeds` (from `embed_inputs`) go straight to the language model with the caller's
        `position_ids` (3, B, L), `attention_mask` (2-D, or 4-D additive (B, 1, Q, L)) and `past_key_values`."""
        if depth_maps is not None or pointer_xy is not None:
            inputs_embeds = self._branch_inputs_embeds(
                input_ids, inputs_embeds, pixel_values, image_grid_thw, depth_maps, pointer_xy, pointer_image_index
            )
            pixel_values = None
        elif pixel_values is not None and self.pointer_token_id is not None and input_ids is not None:
            if bool((input_ids == self.pointer_token_id).any()):
                raise ModelError("input_ids hold pointer tokens but no pointer_xy was given")
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        depth_maps: torch.Tensor | None = None,
        pointer_xy: torch.Tensor | None = None,
        pointer_image_index: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """`GenerationMixin.generate` with `depth_maps` / `pointer_xy`: the image (with depth) and the pointers
        are embedded once for the prefill step; decoding steps use the KV cache as usual."""
        if depth_maps is None and pointer_xy is None:
            return super().generate(
                input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs
            )
        inputs_embeds = self._branch_inputs_embeds(
            input_ids,
            kwargs.pop("inputs_embeds", None),
            pixel_values,
            image_grid_thw,
            depth_maps,
            pointer_xy,
            pointer_image_index,
        )
        return super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, image_grid_thw=image_grid_thw, **kwargs
        )

    # ------------------------------------------------------------------ save / load
    def branch_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the depth branch (names as in `state_dict()`), from `state` if given."""
        return {k: v for k, v in (state or self.state_dict()).items() if is_branch_key(k)}

    def base_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL weights under their original names (patch embedding unwrapped, branch left out), from `state`
        (a `state_dict()`) if given."""
        return {
            k.replace(WRAPPED_PATCH_EMBED, ".patch_embed."): v
            for k, v in (state or self.state_dict()).items()
            if not is_branch_key(k)
        }

    def save_pretrained(
        self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any
    ) -> None:
        """Write a vlm-depth checkpoint (`vlm_depth.model.checkpoint.save_depth_vlm`): base weights (full fine-tune)
        or the LoRA adapter + a `base_model.json` reference, then `depth_branch.safetensors` and
        `vlm_depth_config.json`. Safetensors only. `state_dict`: the weights to write instead of the model's own
        (e.g. gathered from a sharded model)."""
        kwargs.pop("safe_serialization", None)
        save_depth_vlm(self, Path(save_directory), super().save_pretrained, state=state_dict, **kwargs)

    def load_branch(self, folder: str | Path) -> None:
        """Load `depth_branch.safetensors` from `folder`; every branch tensor must be present, nothing else."""
        load_exact_state(
            self,
            Path(folder) / BRANCH_FILE,
            set(self.branch_state_dict()),
            "does not match the branch of vlm_depth_config.json",
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        depth_cfg: DepthBranchConfig | None = None,
        quantization: str | None = None,
        base_model: str | None = None,
        adapter_trainable: bool = False,
        **kwargs: Any,
    ) -> DepthVLM:
        """Load a vlm-depth checkpoint exactly (full fine-tune or LoRA adapter + branch), or a plain Qwen2.5-VL
        checkpoint (e.g. `Qwen/Qwen2.5-VL-3B-Instruct`) with a fresh branch built from `depth_cfg` (default config).

        quantization: None or `nf4` (bitsandbytes 4-bit language model; vision tower, lm_head and branch stay in
        full precision). base_model: overrides the base recorded by a LoRA checkpoint. adapter_trainable: load the
        LoRA weights as trainable. Other keyword arguments go to `Qwen2_5_VLForConditionalGeneration.from_pretrained`.
        See `vlm_depth.model.checkpoint.load_depth_vlm`.
        """
        return load_depth_vlm(
            super().from_pretrained,
            str(pretrained_model_name_or_path),
            *model_args,
            depth_cfg=depth_cfg,
            quantization=quantization,
            base_model=base_model,
            adapter_trainable=adapter_trainable,
            **kwargs,
        )
