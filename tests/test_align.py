"""Depth/image alignment: the processor's grid, a depth resize that never invents values, and patchify/unpatchify
in exactly the order of Qwen2.5-VL's own `pixel_values`."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from vlm_depth.model.align import patchify, processor_grid, resize_depth, unpatchify

# (height, width): multiples of 28, non-multiples, upscaled by min_pixels, downscaled by max_pixels, wide and tall.
SIZES = [(56, 84), (48, 64), (70, 100), (33, 123), (20, 30), (300, 400), (250, 37)]


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return AutoProcessor.from_pretrained(tiny_ckpt)


def _geometry(image_processor) -> tuple[int, int, int]:
    return image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size


def _processor_normalised(image_processor, rgb: np.ndarray) -> torch.Tensor:
    """(1, 3, H', W'): the image after the processor's own resize and rescale+normalise steps."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    p, m, _ = _geometry(image_processor)
    resized = image_processor.resize(image, size=image_processor.size, resample=image_processor.resample, factor=p * m)
    return image_processor.rescale_and_normalize(
        resized,
        image_processor.do_rescale,
        image_processor.rescale_factor,
        image_processor.do_normalize,
        image_processor.image_mean,
        image_processor.image_std,
    )


def _random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", SIZES)
def test_patchify_equals_processor_pixel_values(processor, size):
    ip = processor.image_processor
    rgb = _random_rgb(*size, seed=sum(size))
    reference = ip(images=[rgb], return_tensors="pt")
    ours = patchify(_processor_normalised(ip, rgb), *_geometry(ip))
    assert ours.shape == reference["pixel_values"].shape
    assert torch.allclose(ours, reference["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_of_a_batch_of_different_sizes_equals_processor_pixel_values(processor):
    ip = processor.image_processor
    # Three images, two sizes, so the processor's group-by-shape and reorder path is exercised too.
    images = [_random_rgb(48, 64, 1), _random_rgb(70, 100, 2), _random_rgb(48, 64, 3)]
    reference = ip(images=images, return_tensors="pt")
    ours = torch.cat([patchify(_processor_normalised(ip, rgb), *_geometry(ip)) for rgb in images])
    assert ours.shape == reference["pixel_values"].shape
    assert torch.allclose(ours, reference["pixel_values"], rtol=0, atol=1e-6)


def test_unpatchify_recovers_each_image_from_processor_pixel_values(processor):
    ip = processor.image_processor
    images = [_random_rgb(33, 123, 4), _random_rgb(300, 400, 5)]
    reference = ip(images=images, return_tensors="pt")
    recovered = unpatchify(reference["pixel_values"], reference["image_grid_thw"], 3, *_geometry(ip))
    assert len(recovered) == 2
    for rgb, image in zip(images, recovered):
        assert torch.equal(image, _processor_normalised(ip, rgb)[0])
    assert torch.equal(torch.cat([patchify(x[None], *_geometry(ip)) for x in recovered]), reference["pixel_values"])


@pytest.mark.parametrize("size", SIZES)
def test_processor_grid_is_the_size_the_processor_resizes_to(processor, size):
    ip = processor.image_processor
    grid = processor_grid(*size, ip)
    _, gh, gw = ip(images=[_random_rgb(*size, seed=0)], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == (gh * ip.patch_size, gw * ip.patch_size)
    assert tuple(_processor_normalised(ip, _random_rgb(*size, seed=0)).shape[-2:]) == grid


def _reference_resize(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Brute force in exact rational arithmetic: per output pixel, the valid input (centre inside the output pixel,
    or the nearest input when none) closest to the output centre, first in raster order on ties; else 0."""
    (h, w), (out_h, out_w) = depth.shape, size

    def footprint(i: int, n_in: int, n_out: int) -> list[int]:
        lo, hi = Fraction(i * n_in, n_out), Fraction((i + 1) * n_in, n_out)
        inside = [j for j in range(n_in) if lo <= j + Fraction(1, 2) < hi]
        return inside or [min(math.floor((i + Fraction(1, 2)) * Fraction(n_in, n_out)), n_in - 1)]

    out = np.zeros(size, dtype=np.float32)
    for i in range(out_h):
        rows, cy = footprint(i, h, out_h), (i + Fraction(1, 2)) * Fraction(h, out_h)
        for k in range(out_w):
            cols, cx = footprint(k, w, out_w), (k + Fraction(1, 2)) * Fraction(w, out_w)
            best = None
            for r in rows:
                for c in cols:
                    value = depth[r, c]
                    if np.isfinite(value) and value > 0:
                        dist = (r + Fraction(1, 2) - cy) ** 2 + (c + Fraction(1, 2) - cx) ** 2
                        if best is None or dist < best[0]:
                            best = (dist, value)
            out[i, k] = 0 if best is None else best[1]
    return out


def _sparse_depth(shape: tuple[int, int], density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.1, 300.0, shape).astype(np.float32)
    depth[rng.random(shape) > density] = 0
    depth[rng.random(shape) < 0.05] = np.nan
    depth[rng.random(shape) < 0.05] = np.inf
    depth[rng.random(shape) < 0.05] = -1.0
    return depth


@pytest.mark.parametrize(
    "in_shape, out_shape",
    [((13, 17), (5, 7)), ((7, 5), (16, 11)), ((13, 5), (4, 9)), ((28, 28), (28, 28)), ((9, 12), (6, 8))],
)
@pytest.mark.parametrize("density", [0.1, 1.0])
def test_resize_depth_matches_exact_valid_aware_reference(in_shape, out_shape, density):
    depth = _sparse_depth(in_shape, density, seed=in_shape[0] * 31 + out_shape[1])
    assert np.array_equal(resize_depth(depth, out_shape), _reference_resize(depth, out_shape))


@pytest.mark.parametrize("out_shape", [(56, 84), (28, 28), (224, 308), (31, 500)])
def test_resize_depth_never_invents_values(out_shape):
    depth = _sparse_depth((97, 131), 0.05, seed=out_shape[1])
    out = resize_depth(depth, out_shape)
    assert out.shape == out_shape and out.dtype == np.float32
    valid_inputs = depth[np.isfinite(depth) & (depth > 0)]
    assert np.isin(out[out != 0], valid_inputs).all()
    assert np.isfinite(out).all() and (out >= 0).all()


def test_resize_depth_keeps_every_point_of_a_sparse_map_when_downsampling():
    # One point per 3x3 block of a 96x120 map; downsampling by 2 puts at most one point in each output pixel.
    depth = np.zeros((96, 120), dtype=np.float32)
    depth[1::3, 1::3] = np.arange(1, 32 * 40 + 1, dtype=np.float32).reshape(32, 40) / 10
    out = resize_depth(depth, (48, 60))
    assert sorted(out[out > 0].tolist()) == sorted(depth[depth > 0].tolist())


def test_resize_depth_of_all_missing_is_all_zero():
    assert not resize_depth(np.zeros((40, 60), np.float32), (28, 56)).any()
