"""DepthProcessor: the real Qwen2.5-VL processor's outputs plus `depth_maps`, on the grid of `pixel_values`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from vlm_depth.errors import DataError
from vlm_depth.model.align import patchify, resize_depth, split_maps
from vlm_depth.model.processor import DepthProcessor


@pytest.fixture(scope="module")
def processor(tiny_ckpt) -> DepthProcessor:
    return DepthProcessor.from_pretrained(tiny_ckpt)


def _geometry(processor: DepthProcessor) -> tuple[int, int, int]:
    ip = processor.image_processor
    return ip.patch_size, ip.merge_size, ip.temporal_patch_size


def _sparse(shape: tuple[int, int], density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.2, 80.0, shape).astype(np.float32)
    depth[rng.random(shape) > density] = 0
    return depth


def _rgb(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_outputs_are_the_qwen_processor_outputs_plus_depth_values(processor, tiny_ckpt):
    rgb, depth = _rgb((48, 64), 0), _sparse((48, 64), 0.1, 0)
    inputs = processor(rgb=rgb, depth=depth)
    base = AutoProcessor.from_pretrained(tiny_ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    reference = base(
        images=[rgb], text=[base.apply_chat_template(messages, add_generation_prompt=True)], return_tensors="pt"
    )
    assert set(inputs) == set(reference) | {"depth_maps"}
    for key in reference:
        assert torch.equal(inputs[key], reference[key]), key
    p, _, t = _geometry(processor)
    assert inputs["depth_maps"].shape == (inputs["pixel_values"].shape[0] * p * p,)
    assert inputs["depth_maps"].dtype == torch.float32


def test_default_prompt_ends_with_the_assistant_header_after_the_image(processor):
    text = processor.default_prompt()
    assert text.count("<|image_pad|>") == 1 and text.endswith("<|im_start|>assistant\n")
    assert text.index("<|vision_end|>") < text.index("<|im_start|>assistant")


def test_patchified_depth_maps_lie_on_the_same_pixels_as_pixel_values_rows(processor):
    # Images already on their grid (no resampling): depth is a function of the red channel, so row i of the depth
    # maps patchified as the model's depth branch patchifies its output must equal that function of the red values
    # in row i of the processor's own pixel_values.
    ip = processor.image_processor
    p, m, t = _geometry(processor)
    images = [_rgb((56, 84), 1), _rgb((112, 56), 2)]
    depths = [image[..., 0].astype(np.float32) / 10 + 0.5 for image in images]
    inputs = processor(rgb=images, depth=depths)
    maps = split_maps(inputs["depth_maps"], inputs["image_grid_thw"], p)
    rows = torch.cat([patchify(d[None, None], p, m, t) for d in maps])
    red = inputs["pixel_values"][:, : t * p * p] * ip.image_std[0] + ip.image_mean[0]
    expected = torch.round(red * 255) / 10 + 0.5
    assert inputs["pixel_values"].shape[0] == 56 * 84 // p**2 + 112 * 56 // p**2
    assert torch.allclose(rows, expected, rtol=0, atol=1e-4)


def test_a_batch_of_two_sizes_gives_each_image_its_resized_depth(processor):
    shapes = [(48, 64), (100, 70)]
    images = [_rgb(s, i) for i, s in enumerate(shapes)]
    depths = [_sparse(s, 0.2, i) for i, s in enumerate(shapes)]
    inputs = processor(rgb=images, depth=depths)
    recovered = split_maps(inputs["depth_maps"], inputs["image_grid_thw"], processor.image_processor.patch_size)
    for depth, shape, image in zip(depths, shapes, recovered):
        assert torch.equal(image, torch.from_numpy(resize_depth(depth, processor.grid_size(*shape))))
    assert inputs["input_ids"].shape[0] == 2


def test_depth_of_another_resolution_is_resized_onto_the_rgb_grid(processor):
    rgb = _rgb((96, 128), 3)
    half = _sparse((48, 64), 0.3, 3)
    inputs = processor(rgb=rgb, depth=half)
    grid = processor.grid_size(96, 128)
    (image,) = split_maps(inputs["depth_maps"], inputs["image_grid_thw"], processor.image_processor.patch_size)
    assert tuple(image.shape) == grid
    assert torch.equal(image, torch.from_numpy(resize_depth(half, grid)))

    # A scene of four constant quadrants gives the same grid depth from a half- and a full-resolution map.
    def quadrants(h: int, w: int) -> np.ndarray:
        rows, cols = np.mgrid[:h, :w]
        return (1 + (rows >= h // 2) + 2 * (cols >= w // 2)).astype(np.float32)

    from_half, from_full = (
        processor(rgb=rgb, depth=d)["depth_maps"].view(grid) for d in (quadrants(48, 64), quadrants(96, 128))
    )
    assert torch.equal(from_half, from_full)
    assert sorted(from_half.unique().tolist()) == [1.0, 2.0, 3.0, 4.0]


def test_depth_with_another_aspect_ratio_is_refused(processor):
    with pytest.raises(DataError, match="aspect"):
        processor(rgb=_rgb((48, 64), 0), depth=np.ones((48, 48), np.float32))
    processor(rgb=_rgb((480, 640), 0), depth=np.ones((239, 320), np.float32))  # within 1 %: accepted


@pytest.mark.parametrize("depth", [None, "zeros"])
def test_no_depth_or_all_zero_depth_is_monocular(processor, depth):
    rgb = _rgb((48, 64), 4)
    inputs = processor(rgb=rgb, depth=np.zeros((48, 64), np.float32) if depth == "zeros" else None)
    patch = processor.image_processor.patch_size
    assert inputs["depth_maps"].shape[0] == inputs["pixel_values"].shape[0] * patch**2
    assert not inputs["depth_maps"].any()


def test_bad_inputs_raise_data_errors(processor):
    with pytest.raises(DataError, match="uint8"):
        processor(rgb=np.zeros((48, 64, 3), np.float32))
    with pytest.raises(DataError, match="depth maps"):
        processor(rgb=[_rgb((48, 64), 0)] * 2, depth=[np.ones((48, 64), np.float32)])
    with pytest.raises(DataError, match="outside"):
        processor.to_grid_xy(64, 0, (48, 64))


def test_to_grid_xy_names_the_grid_pixel_where_resize_puts_that_pixels_depth(processor):
    shape = (300, 400)  # downscaled by max_pixels
    rng = np.random.default_rng(5)
    for _ in range(20):
        x, y = int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0]))
        depth = np.zeros(shape, np.float32)
        depth[y, x] = 3.25
        grid = resize_depth(depth, processor.grid_size(*shape))
        gx, gy = processor.to_grid_xy(x, y, shape)
        assert np.argwhere(grid > 0).tolist() == [[math.floor(gy + 0.5), math.floor(gx + 0.5)]]
    gx, gy = processor.to_grid_xy(0, 0, (56, 84))  # no resize: pixel centres map to themselves
    assert (gx, gy) == (0.0, 0.0)


def test_save_and_load_round_trip_gives_identical_inputs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = DepthProcessor.from_pretrained(tmp_path)
    rgb, depth = _rgb((70, 100), 6), _sparse((70, 100), 0.1, 6)
    a, b = processor(rgb=rgb, depth=depth), loaded(rgb=rgb, depth=depth)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
