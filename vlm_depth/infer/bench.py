"""`vlm-depth bench decoder`: the pixel-query decoder against one `model.generate()` per pixel, on the same image
and the same query pixels.

Timed, on one synthetic RGB-D frame (`vlm_depth.data.synthetic`, height x width) and `query_pixels` pixels with
distinct query text (distinct grid cells in coords mode, so the decoder's de-duplication gains nothing):
(a) naive: `decode_naive`, one grammar-constrained `generate()` per pixel on the full sequence (image, depth branch
    and prefix re-encoded every time), run once;
(b) fast: `QueryDecoder.encode_prefix` + `decode`, best of `repeats` runs;
(c) forward: the fast decoder's query tokens (each block with its decoded number, minus the last digit, which is
    never fed back) in one forward per chunk against the precomputed prefix, best of `repeats`: the lower bound of
    the query phase. `overhead_vs_forward` = query phase of (b) / (c).
`identical`: the greedy answers of (a) and (b) agree at every query except near-ties (the naive run's two best
allowed logits within 1e-5 at a decoded position; counted in `near_ties`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.infer.decoder import QueryDecoder
from vlm_depth.infer.naive import decode_naive
from vlm_depth.infer.readouts import chat_layout, pixel_queries
from vlm_depth.model.loading import load_model

NEAR_TIE = 1e-5


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


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_decoder(
    model_path: str,
    *,
    height: int = 448,
    width: int = 448,
    seed: int = 0,
    query_pixels: int = 512,
    max_queries_per_pass: int = 128,
    packing: str = "batch",
    repeats: int = 3,
) -> dict[str, Any]:
    """Run the decoder benchmark (see the module docstring) on the checkpoint `model_path` with `query_pixels`
    pixels of one synthetic height x width frame; returns the JSON summary."""
    from vlm_depth.data.synthetic import generate_sample

    if query_pixels < 1 or repeats < 1:
        raise ConfigError("bench decoder: query_pixels and repeats must be >= 1")
    model, processor = load_model(model_path)
    layout = chat_layout(model, processor.tokenizer)
    sample = generate_sample(0, seed, height, width)
    sparse = sample.depth_at_rgb_resolution()
    rows, cols = distinct_query_pixels(processor, sparse.shape, query_pixels, seed)
    queries = pixel_queries(layout, processor, sparse, rows, cols)
    inputs = processor(sample.rgb, sparse, text=layout.prefix_text())
    decoder = QueryDecoder(model, layout, max_queries_per_pass=max_queries_per_pass, packing=packing)

    prefix = decoder.encode_prefix(inputs)
    fast = decoder.decode(prefix, queries)  # warm-up; its answers define the forward's tokens
    blocks = [(q.prompt + q.answer_prefix + tokens[:-1], q.pointer_xy) for q, tokens in zip(queries, fast.tokens)]
    prefix_s = _best(lambda: decoder.encode_prefix(inputs), repeats)
    decode_s = _best(lambda: decoder.decode(prefix, queries), repeats)
    forward_s = _best(lambda: decoder.forward_blocks(prefix, blocks), repeats)

    start = time.perf_counter()
    naive = decode_naive(model, layout, inputs, queries, progress=True)
    naive_s = time.perf_counter() - start

    ties = naive.margin < NEAR_TIE
    differ = np.array([a != b for a, b in zip(fast.tokens, naive.tokens)])
    fast_s = prefix_s + decode_s
    n = len(queries)
    return {
        "query_pixels": n,
        "naive_pixels_per_s": n / naive_s,
        "fast_pixels_per_s": n / fast_s,
        "speedup": naive_s / fast_s,
        "overhead_vs_forward": decode_s / forward_s,
        "identical": bool(not (differ & ~ties).any()),
        "near_ties": int(ties.sum()),
        "differ_at_near_ties": int((differ & ties).sum()),
        "keep_queries": int((sparse[rows, cols] > 0).sum()),
        "seconds": {"naive": naive_s, "fast": fast_s, "prefix": prefix_s, "decode": decode_s, "forward": forward_s},
        "image": [int(sparse.shape[0]), int(sparse.shape[1])],
        "prefix_tokens": prefix.length,
        "query_mode": model.depth_cfg.query_mode,
        "packing": packing,
        "max_queries_per_pass": max_queries_per_pass,
        "device": str(decoder.device),
        "torch_threads": torch.get_num_threads(),
    }
