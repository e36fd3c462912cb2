"""Offline tiny Qwen2.5-VL checkpoint: small config with random weights, a locally trained byte-level BPE tokenizer
that splits numbers into single digits (like Qwen2's), and the real Qwen2.5-VL processor.

The folder it writes is an ordinary Hugging Face checkpoint: `Qwen2_5_VLForConditionalGeneration.from_pretrained`
and `AutoProcessor.from_pretrained` load it with no network, through the same code path as
`Qwen/Qwen2.5-VL-3B-Instruct`. With `arch` it writes the real architecture instead (`ARCHS`: the published
config.json values of Qwen2.5-VL-3B / 7B, random bf16 weights, the same tiny tokenizer): GPU measurements of the
real shapes without a download, or at reduced depth (same widths) on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_depth.errors import ConfigError
from vlm_depth.files import atomic_dir, fault_point
from vlm_depth.resources import resource_files

TINY_SETTINGS = "vlm_depth_tiny.yaml"  # the settings of a tiny checkpoint, written last

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (images and videos as placeholders, default system prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Published config.json values of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct. Token ids are the tiny tokenizer's
# (ids beyond it are never produced); every other text and vision value is the published one.
_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
_TEXT = dict(
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    sliding_window=32768,
    use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": dict(
        text=_TEXT
        | dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_window_layers=70,
        ),
        vision=_VISION | dict(out_hidden_size=2048),
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": dict(
        text=_TEXT
        | dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_window_layers=28,
        ),
        vision=_VISION | dict(out_hidden_size=3584),
        tie_word_embeddings=False,
    ),
}
ARCH_MAX_PIXELS = 28 * 28 * 1280  # keeps 640x480 at its size (smart_resize: 644x476, 391 merged tokens)
TINY_MAX_PIXELS = 28 * 28 * 100

_BASE_TEXT = [
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "Picture 1: Video 1:",
    "The image shows a room, a street, a table, a wall, a floor, a window, a car and the sky.",
    "Complete the depth map. Predict the metric depth of every pixel in meters.",
    "The pixel at (x, y) = (12, 34) is 5.678 meters away from the camera.",
]


def _prompt_corpus() -> Iterator[str]:
    """Every string in the prompt templates (top-level `prompts/`), so the tokenizer covers their vocabulary."""
    import yaml

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node.replace("{x}", "1.234").replace("{y}", "5.678")
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    for path in resource_files("prompts"):
        yield from strings(yaml.safe_load(path.read_text()))


def build_tokenizer(vocab_size: int = 640):
    """Train a Qwen2-style byte-level BPE (digits split one by one) on the prompt corpus; returns Qwen2Tokenizer."""
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])  # Qwen2's own normalizer/pre-tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    corpus = list(_BASE_TEXT) + list(_prompt_corpus())
    bpe.train_from_iterator(corpus * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _qwen_config(tokenizer, text: dict[str, Any], vision: dict[str, Any], tie: bool):
    """Qwen2_5_VLConfig from text and vision settings, with the special-token ids of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = text | dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def tiny_config(tokenizer, hidden_size: int = 128, num_layers: int = 2, vision_depth: int = 2):
    """A small but structurally complete Qwen2_5_VLConfig (M-RoPE sections sum to head_dim / 2)."""
    heads = hidden_size // 32
    text = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
    )
    vision = _VISION | dict(
        depth=vision_depth,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_depth - 1],
    )
    return _qwen_config(tokenizer, text, vision, tie=False)


def arch_config(tokenizer, arch: str, num_layers: int = 0, vision_depth: int = 0):
    """The published Qwen2_5_VLConfig of `arch` (a key of `ARCHS`) with the token ids of `tokenizer`. num_layers /
    vision_depth > 0 reduce the depth (same widths); full-attention vision blocks keep the published rule (every
    8th block), or the last block of a tower shorter than 8."""
    spec = ARCHS[arch]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    if num_layers:
        text["num_hidden_layers"] = num_layers
    if vision_depth:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1]
    return _qwen_config(tokenizer, text, vision, tie=spec["tie_word_embeddings"])


def build_processor(tokenizer, min_pixels: int, max_pixels: int):
    """The real Qwen2.5-VL processor around `tokenizer`, with a small pixel budget."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def check_tiny_settings(
    hidden_size: int,
    num_layers: int,
    vision_depth: int,
    min_pixels: int,
    max_pixels: int,
    arch: str = "tiny",
    arch_layers: int = 0,
    arch_vision_depth: int = 0,
) -> None:
    """ConfigError for tiny-checkpoint settings that cannot build a working model (max_pixels 0 = the
    architecture's budget)."""
    if arch != "tiny" and arch not in ARCHS:
        raise ConfigError(f"tiny: --arch must be tiny or one of {sorted(ARCHS)}, got {arch!r}")
    if arch == "tiny" and (arch_layers or arch_vision_depth):
        raise ConfigError("tiny: --arch_layers / --arch_vision_depth reduce an --arch; the tiny one has --num_layers")
    if arch != "tiny" and (hidden_size, num_layers, vision_depth) != (128, 2, 2):
        raise ConfigError(f"tiny: --arch {arch} has its published widths; reduce its depth with --arch_layers")
    if hidden_size < 32 or hidden_size % 32:
        raise ConfigError(f"tiny: hidden_size must be a positive multiple of 32 (head_dim 32), got {hidden_size}")
    if num_layers < 1 or vision_depth < 1 or arch_layers < 0 or arch_vision_depth < 0:
        raise ConfigError(f"tiny: num_layers and vision_depth must be >= 1, got {num_layers} and {vision_depth}")
    if not 0 < min_pixels <= (max_pixels or TINY_MAX_PIXELS):
        raise ConfigError(f"tiny: need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")


def build_tiny_checkpoint(
    out: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_depth: int = 2,
    max_pixels: int = 0,
    min_pixels: int = 28 * 28 * 4,
    arch: str = "tiny",
    arch_layers: int = 0,
    arch_vision_depth: int = 0,
) -> dict[str, Any]:
    """Write the tiny checkpoint folder `out` (random weights from `seed`; text width `hidden_size` with head_dim
    32, `num_layers` text layers, `vision_depth` vision blocks, the processor's pixel budget, 0 = 28*28*100);
    returns a summary (path, parameter count, vocabulary size). The settings are recorded in `vlm_depth_tiny.yaml`,
    written last.

    arch: `tiny`, or a key of `ARCHS` for the published architecture (random bf16 weights, drawn on the GPU when
    there is one; `arch_layers` / `arch_vision_depth` > 0 reduce its depth; budget 0 = `ARCH_MAX_PIXELS`).

    The folder appears whole or not at all (built beside it, then renamed), and the global torch RNG is left as it
    was: a training process that builds its base gives the same run as one that finds it built."""
    import torch
    import yaml
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    check_tiny_settings(
        hidden_size, num_layers, vision_depth, min_pixels, max_pixels, arch, arch_layers, arch_vision_depth
    )
    out = Path(out)
    max_pixels = max_pixels or (TINY_MAX_PIXELS if arch == "tiny" else ARCH_MAX_PIXELS)
    settings = dict(
        out=str(out),
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vision_depth=vision_depth,
        max_pixels=max_pixels,
        min_pixels=min_pixels,
    )
    tokenizer = build_tokenizer()
    if arch == "tiny":
        config, device = tiny_config(tokenizer, hidden_size, num_layers, vision_depth), "cpu"
    else:
        for key in ("hidden_size", "num_layers", "vision_depth"):  # the tiny architecture's, not this one's
            del settings[key]
        settings |= dict(arch=arch, arch_layers=arch_layers, arch_vision_depth=arch_vision_depth)
        config = arch_config(tokenizer, arch, arch_layers, arch_vision_depth)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # billions of random numbers: fast on a GPU
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        if arch == "tiny":
            model = Qwen2_5_VLForConditionalGeneration(config).eval()
        else:  # bf16 as published (and recorded in config.json)
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.bos_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        fault_point("tiny-base")
        build_processor(tokenizer, min_pixels, max_pixels).save_pretrained(tmp)
        (tmp / TINY_SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
    return {
        "out": str(out),
        "arch": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.text_config.vocab_size,
        "tokenizer_size": len(tokenizer),
    }
