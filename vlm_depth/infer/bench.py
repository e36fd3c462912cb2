"""`vlm-depth bench decoder`: the pixel-query decoder against one `model.generate()` per pixel, on the same image
and the same query pixels, on the model's device (cuda when available), with the MDM readout on the same frame.

Timed, on one synthetic RGB-D frame (`vlm_depth.data.synthetic`, height x width) and `query_pixels` pixels with
distinct query text (distinct grid cells in coords mode, so the decoder's de-duplication gains nothing), the device
synchronised before every clock read:
(a) naive: `decode_naive`, one grammar-constrained `generate()` per pixel on the full sequence (image, depth branch
    and prefix re-encoded every time), run once;
(b) fast: `QueryDecoder.encode_prefix` + `decode`, best of `repeats` runs;
(c) forward: the fast decoder's query tokens (each block with its decoded number, minus the last digit, which is
    never fed back) in one forward per chunk against the precomputed prefix, best of `repeats`: the lower bound of
    the query phase. `overhead_vs_forward` = query phase of (b) / (c);
(d) mdm: the MDM readout's dense map of the frame (a plain checkpoint gets a fresh head), best of `repeats`.
Agreement of (a) and (b): in fp32, `identical` = the greedy answers agree at every query except near-ties (the naive
run's two best allowed logits within 1e-5); in bf16 that threshold means nothing (rounding moves logits by ~1e-2),
so `identical` is null and `agreement` gives the share of identical answers and the largest differences (meters).
Also: peak memory of (b), and the model FLOPs of (b) (`vlm_depth.model.flops`) over its time as MFU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.infer.decoder import QueryDecoder
from vlm_depth.infer.naive import decode_naive
from vlm_depth.infer.readouts import ReadoutSettings, chat_layout, mdm_readout, pixel_queries
from vlm_depth.model import flops, measure
from vlm_depth.model.loading import load_model

NEAR_TIE = 1e-5
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def distinct_query_pixels(processor, shape: tuple[int, int], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` random pixels (rows, cols) of an image of `shape` that fall in distinct cells of the processor's
    resized grid (so their coords-mode query texts differ)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.divmod(rng.permutation(shape[0] * shape[1]), shape[1])
    cells, picked = set(), []
    for row, col in zip(rows.tolist(), cols.tolist()):
        cell = tuple(round(c) for c in processor.to_grid_xy(col, row, shape))
        if cell not in cells:
            cells.add(cell)
            picked.append((row, col))
            if len(picked) == count:
                return tuple(np.array(v) for v in zip(*picked))
    raise ConfigError(f"bench decoder: the image has only {len(picked)} distinct grid cells for {count} queries")


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = measure.clock(device)
        fn()
        times.append(measure.clock(device) - start)
    return min(times)


def _decode_flops(model, decoder: QueryDecoder, prefix_length: int, blocks: list[list[int]]) -> float:
    """Forward FLOPs of the query phase: per chunk, the shared leading tokens once and every block's rest (what
    `forward_blocks` feeds), each token attending the prefix and its block's earlier tokens; the 11-row head at
    every decoded position."""
    unique = sorted({tuple(b) for b in blocks})
    tokens = pairs = 0.0
    for start in range(0, len(unique), decoder.max_queries_per_pass):
        chunk = [list(b) for b in unique[start : start + decoder.max_queries_per_pass]]
        shared = decoder.shared_length(chunk)
        rests = [len(b) - shared for b in chunk]
        tokens += shared + sum(rests)
        pairs += shared * prefix_length + shared * (shared + 1) / 2
        pairs += sum(r * (prefix_length + shared) + r * (r + 1) / 2 for r in rests)
    positions = decoder.grammar.max_tokens * len(unique)
    return sum(flops.text_forward(flops.ArchShape.of(model.config), tokens, pairs, positions, head_rows=11).values())


def bench_decoder(
    model_path: str,
    *,
    height: int = 448,
    width: int = 448,
    seed: int = 0,
    query_pixels: int = 512,
    max_queries_per_pass: int = -1,
    packing: str = "batch",
    repeats: int = 3,
    dtype: str = "auto",
    compile: bool = False,
    peak_tflops: float = 0.0,
) -> dict[str, Any]:
    """Run the decoder benchmark (see the module docstring) on the checkpoint `model_path` with `query_pixels`
    pixels of one synthetic height x width frame; `dtype` auto | float32 | bfloat16 of the weights; `compile`:
    regional compilation of the decoder layers for (b) and (c); returns the JSON summary."""
    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.model.branch_config import DepthBranchConfig
    from vlm_depth.model.speed import compile_decoder_layers

    if query_pixels < 1 or repeats < 1:
        raise ConfigError("bench decoder: query_pixels and repeats must be >= 1")
    if dtype not in DTYPES:
        raise ConfigError(f"bench decoder: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    fresh = None if DepthBranchConfig.exists(model_path) else DepthBranchConfig(mdm_head=True)  # plain: + MDM head
    model, processor = load_model(model_path, dtype=DTYPES[dtype], branch=fresh)
    device, weights = model.device, model.get_input_embeddings().weight.dtype
    layout = chat_layout(model, processor.tokenizer)
    sample = generate_sample(0, seed, height, width)
    sparse = sample.depth_at_rgb_resolution()
    rows, cols = distinct_query_pixels(processor, sparse.shape, query_pixels, seed)
    queries = pixel_queries(layout, processor, sparse, rows, cols)
    inputs = processor(sample.rgb, sparse, text=layout.prefix_text())
    decoder = QueryDecoder(model, layout, max_queries_per_pass=max_queries_per_pass, packing=packing)

    start = measure.clock(device)
    naive = decode_naive(model, layout, inputs, queries, progress=True)
    naive_s = measure.clock(device) - start
    if compile:
        compile_decoder_layers(model)
    prefix = decoder.encode_prefix(inputs)
    fast = decoder.decode(prefix, queries)  # warm-up; its answers define the forward's tokens
    blocks = [(q.prompt + q.answer_prefix + tokens[:-1], q.pointer_xy) for q, tokens in zip(queries, fast.tokens)]
    prefix_s = _best(lambda: decoder.encode_prefix(inputs), repeats, device)
    measure.reset_peak_memory(device)
    decode_s = _best(lambda: decoder.decode(prefix, queries), repeats, device)
    memory = measure.peak_memory(device)
    forward_s = _best(lambda: decoder.forward_blocks(prefix, blocks), repeats, device)
    mdm = None
    if model.depth_branch.mdm_head is not None:
        mdm_s = _best(lambda: mdm_readout(model, processor, sample.rgb, sparse, ReadoutSettings()), repeats, device)
        mdm = {"maps_per_s": 1 / mdm_s, "seconds": mdm_s}

    ties = naive.margin < NEAR_TIE
    differ = np.array([a != b for a, b in zip(fast.tokens, naive.tokens)])
    exact = weights == torch.float32
    peak, peak_source = measure.peak_tflops(device, peak_tflops)
    decode_flops = _decode_flops(model, decoder, prefix.length, [ids for ids, _ in blocks])
    fast_s = prefix_s + decode_s
    n = len(queries)
    return {
        "query_pixels": n,
        "naive_pixels_per_s": n / naive_s,
        "fast_pixels_per_s": n / fast_s,
        "speedup": naive_s / fast_s,
        "overhead_vs_forward": decode_s / forward_s,
        "identical": bool(not (differ & ~ties).any()) if exact else None,
        "near_ties": int(ties.sum()),
        "differ_at_near_ties": int((differ & ties).sum()),
        "agreement": {
            "dtype": str(weights).removeprefix("torch."),
            "identical_share": float(1 - differ.mean()),
            "max_value_diff_m": float(np.nanmax(np.abs(fast.value - naive.value))),
            "max_expected_diff_m": float(np.nanmax(np.abs(fast.expected - naive.expected))),
        },
        "keep_queries": int((sparse[rows, cols] > 0).sum()),
        "seconds": {"naive": naive_s, "fast": fast_s, "prefix": prefix_s, "decode": decode_s, "forward": forward_s},
        "decode_tflop": round(decode_flops / 1e12, 4),
        "decode_mfu": measure.mfu(decode_flops, decode_s, peak),
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        **memory,
        "mdm": mdm,
        "image": [int(sparse.shape[0]), int(sparse.shape[1])],
        "prefix_tokens": prefix.length,
        "query_mode": model.depth_cfg.query_mode,
        "packing": packing,
        "max_queries_per_pass": decoder.max_queries_per_pass,
        "compile": compile,
        "device": str(device),
        "device_name": measure.device_name(device),
        "torch_threads": torch.get_num_threads(),
    }
