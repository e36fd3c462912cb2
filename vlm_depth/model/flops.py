"""FLOPs of the architecture (for MFU): a multiply-add is 2 FLOPs, a (m, k) @ (k, n) product 2 m k n.

Forward, per image and per sequence of a Qwen2.5-VL + depth branch:

- vision (S patches, width c, MLP width f_v, D_v blocks): patch embeddings 2 S (3 t p^2) c each (F_e1, and F_e2
  with depth), blocks D_v S 2 (4 c^2 + 3 c f_v), attention 4 c (sum of window^2 over windowed blocks + S^2 over
  full-attention blocks), merger 2 (S / 4)(16 c^2 + 4 c d);
- text (N tokens, width d, KV width d_kv, MLP width f, L layers): linear L N 2 d (2 d + 2 d_kv + 3 f), LoRA of rank
  r on the 7 projections L N 2 r sum(d_in + d_out), attention L 4 d pairs (query-key pairs that the mask allows),
  LM head 2 d V per projected position (V = 11 rows for the decoder's restricted head);
- the depth branch's convolutions are counted by the caller (`torch.utils.flop_counter` on one call).

A LoRA training step with frozen base weights: frozen matmuls need the input gradient only (1x the forward), LoRA,
attention and the branch input and weight gradients (2x), so step = 2 x frozen linear + 3 x (LoRA + attention +
branch) + 2 x head. Gradient checkpointing re-runs forwards: hardware FLOPs, not counted (MFU counts model FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchShape:
    """The sizes of a Qwen2.5-VL config that its FLOPs depend on."""

    width: int
    mlp: int
    layers: int
    kv_width: int
    vocab: int
    vision_width: int
    vision_mlp: int
    vision_depth: int
    full_blocks: int
    patch: int
    temporal_patch: int
    merge: int
    window: int

    @classmethod
    def of(cls, config) -> ArchShape:
        text, vision = config.get_text_config(), config.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        return cls(
            width=text.hidden_size,
            mlp=text.intermediate_size,
            layers=text.num_hidden_layers,
            kv_width=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
            vision_width=vision.hidden_size,
            vision_mlp=vision.intermediate_size,
            vision_depth=vision.depth,
            full_blocks=len([i for i in vision.fullatt_block_indexes if i < vision.depth]),
            patch=vision.patch_size,
            temporal_patch=vision.temporal_patch_size,
            merge=vision.spatial_merge_size,
            window=vision.window_size,
        )

    def lora_io(self) -> int:
        """sum(d_in + d_out) over the 7 LoRA projections of a decoder layer."""
        d, kv, f = self.width, self.kv_width, self.mlp
        return (d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d)


def window_patches(shape: ArchShape, grid_h: int, grid_w: int) -> list[int]:
    """Patches per attention window of a (grid_h, grid_w) patch grid (transformers' `get_vision_window_index`)."""
    side = shape.window // shape.merge // shape.patch  # window side in merged tokens
    rows, cols = grid_h // shape.merge, grid_w // shape.merge
    heights = [min(side, rows - i) for i in range(0, rows, side)]
    widths = [min(side, cols - j) for j in range(0, cols, side)]
    return [h * w * shape.merge**2 for h in heights for w in widths]


def vision_forward(shape: ArchShape, grid_thw: Sequence[int], depth: bool = True) -> dict[str, float]:
    """Forward FLOPs of the vision tower for one image of `grid_thw` (t, h, w): `linear` (patch embeddings, blocks,
    merger) and `attention`; `depth`: F_e2 also embeds the depth branch's output."""
    t, h, w = (int(v) for v in grid_thw)
    s, c = t * h * w, shape.vision_width
    embed = (2 if depth else 1) * 2 * s * 3 * shape.temporal_patch * shape.patch**2 * c
    blocks = shape.vision_depth * s * 2 * (4 * c * c + 3 * c * shape.vision_mlp)
    merger = 2 * (s / 4) * (16 * c * c + 4 * c * shape.width)
    windowed = t * sum(n * n for n in window_patches(shape, h, w))
    attention = 4 * c * ((shape.vision_depth - shape.full_blocks) * windowed + shape.full_blocks * s * s)
    return {"linear": embed + blocks + merger, "attention": attention}


def packed_pairs(prefix: int, blocks: Sequence[int]) -> float:
    """Query-key pairs of one image prefix of `prefix` tokens and query blocks of `blocks` tokens (causal, each
    block over the prefix and itself); with one block, the pairs of a causal sequence of prefix + block tokens."""
    return prefix * (prefix + 1) / 2 + sum(t * prefix + t * (t + 1) / 2 for t in blocks)


def text_forward(
    shape: ArchShape, tokens: float, pairs: float, projected: float, lora_r: int = 0, head_rows: int = 0
) -> dict[str, float]:
    """Forward FLOPs of the language model on `tokens` tokens with `pairs` attended query-key pairs and the LM
    head on `projected` positions (over `head_rows` rows, default the vocabulary): `linear`, `lora`,
    `attention`, `head`."""
    d, layers = shape.width, shape.layers
    return {
        "linear": layers * tokens * 2 * d * (2 * d + 2 * shape.kv_width + 3 * shape.mlp),
        "lora": layers * tokens * 2 * lora_r * shape.lora_io(),
        "attention": layers * 4 * d * pairs,
        "head": projected * 2 * d * (head_rows or shape.vocab),
    }


@dataclass
class PackedRow:
    """One image's sequence of a training micro-batch: its patch grid (t, h, w), prefix length and block lengths."""

    grid_thw: Sequence[int]
    prefix: int
    blocks: Sequence[int]


def train_step_flops(
    shape: ArchShape, sequences: Sequence[PackedRow], answer_tokens: int, lora_r: int, branch_forward: float
) -> float:
    """Model FLOPs of one LoRA forward + backward over `sequences` (vision tower and depth branch once per
    sequence, `branch_forward` FLOPs each), with the LM head on `answer_tokens` positions (see module docstring)."""
    frozen = trained = 0.0
    for seq in sequences:
        vision = vision_forward(shape, seq.grid_thw)
        text = text_forward(shape, seq.prefix + sum(seq.blocks), packed_pairs(seq.prefix, seq.blocks), 0, lora_r)
        frozen += vision["linear"] + text["linear"]
        trained += vision["attention"] + text["attention"] + text["lora"] + branch_forward
    head = text_forward(shape, 0, 0, answer_tokens)["head"]
    return 2 * frozen + 3 * trained + 2 * head
