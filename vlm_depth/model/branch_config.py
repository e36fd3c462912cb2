"""The `vlm_depth` config block of a DepthVLM checkpoint: everything the depth branch, pointer mode and heads need
to be rebuilt exactly. Saved as `vlm_depth_config.json` next to the Hugging Face weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlm_depth.config import typed_values
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.files import atomic_write

CONFIG_NAME = "vlm_depth_config.json"


@dataclass
class DepthBranchConfig:
    """Depth injection (VLM-DC "Sparse Depth Injection"), depth encoding, pixel identification and heads."""

    fusion: Literal["soft", "he_init", "hard_concat"] = field(
        default="soft",
        metadata={
            "help": "soft: zero-init fusion branch added to patch tokens (paper default); he_init: same "
            "blocks, He init; hard_concat: depth as an extra input channel of a widened patch embedding."
        },
    )
    depth_encoding: Literal["metric", "inverse", "log", "pde"] = field(
        default="pde",
        metadata={
            "help": "metric (m / max_depth), inverse (1 m / depth), log (log depth, scaled), or pde: "
            "Vanishing Depth's sinusoidal positional depth encoding. Missing depth is a separate state."
        },
    )
    pde_channels: int = field(default=32, metadata={"help": "Channels of the sinusoidal depth encoding (even)."})
    max_depth: float = field(default=80.0, metadata={"help": "Depth scale in meters for encodings and clipping."})
    depth_channels: int = field(default=32, metadata={"help": "Width of the zero-init depth conv (S-hat)."})
    rgb_channels: int = field(default=32, metadata={"help": "Width of the small RGB conv encoder (F-hat)."})
    fusion_channels: int = field(default=64, metadata={"help": "Width of the two fusion conv layers."})
    patch_embed_init: Literal["copy", "shared"] = field(
        default="copy",
        metadata={"help": "F_e2: copy of the native patch embedding (trainable) or shared with it."},
    )
    query_mode: Literal["coords", "pointer"] = field(
        default="coords", metadata={"help": "How a query names its pixel: coordinates as text, or a pointer token."}
    )
    pointer_token: str = field(default="<|depth_pointer|>", metadata={"help": "Special token of pointer mode."})
    pointer_fourier: int = field(default=16, metadata={"help": "Fourier features of the pointer's sub-token offset."})
    template: str = field(default="paper", metadata={"help": "Prompt template name (top-level prompts/)."})
    decimals: int = field(default=3, metadata={"help": "Decimals of answers in meters."})
    mdm_head: bool = field(
        default=False,
        metadata={"help": "Add the MDM head (LingBot-Depth ConvStack on the visual tokens): a dense readout, `mdm`."},
    )
    mdm_tokens: Literal["pre_merger", "post_merger"] = field(
        default="pre_merger",
        metadata={"help": "Tokens the MDM head reads: 14-px patch tokens before the 2x2 merger, or merged tokens."},
    )
    mdm_width: int = field(default=256, metadata={"help": "MDM head channels at the token grid (halved per level)."})
    mdm_levels: int = field(default=4, metadata={"help": "MDM head 2x upsampling levels (4: 14 px -> 0.875 px)."})
    mdm_blocks: int = field(default=1, metadata={"help": "MDM head residual conv blocks per level."})
    mdm_pyramid: int = field(
        default=0,
        metadata={
            "help": "0: the MDM head ends at its last upsampling level. N > 0: a full-resolution stage at the "
            "processor's grid reads the sparse input's depth pyramid (per cell of 1, 2, 4, ... 2^(N-1) px: the "
            "valid-weighted mean log-depth and the valid share; parameter-free) with the upsampled head features."
        },
    )
    mdm_fullres_width: int = field(default=32, metadata={"help": "MDM head channels of the full-resolution stage."})
    mdm_fullres_blocks: int = field(default=1, metadata={"help": "MDM head residual blocks at full resolution."})
    mdm_pyramid_mix: bool = field(
        default=False,
        metadata={
            "help": "With mdm_pyramid: the head outputs a learned per-pixel softmax mixture of the pyramid's mean "
            "log-depths (cells with depth only, plus a prior at sqrt(max_depth)) plus a learned residual, instead "
            "of log-depth directly."
        },
    )
    mdm_pyramid_taps: int = field(
        default=1,
        metadata={
            "help": "Mixture slots per pyramid scale: 1 (the cell at the pixel), 9 or 25 (also the cells up to 1 or "
            "2 cells away in every direction, so the learned weights can interpolate across a hole from its sides)."
        },
    )

    def save(self, folder: str | Path) -> Path:
        return atomic_write(Path(folder) / CONFIG_NAME, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> DepthBranchConfig:
        """The branch config saved in a checkpoint folder; ModelError naming the file when it is not valid JSON,
        has unknown keys or values of the wrong type (a damaged checkpoint, not a user option)."""
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelError(f"{path}: not valid JSON ({err}); re-save the checkpoint") from err
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object of branch settings, got {data!r:.40}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"{path}: unknown keys {sorted(unknown)}; a checkpoint of another vlm-depth version?")
        try:
            return cls(**typed_values(cls, data, str(path)))
        except ConfigError as err:
            raise ModelError(str(err)) from err

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return (Path(folder) / CONFIG_NAME).is_file()
