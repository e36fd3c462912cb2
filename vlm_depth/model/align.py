"""Alignment of depth with Qwen2.5-VL's image path: the processor's resized grid, a depth resize that never invents
values, the flat per-image map layout of `depth_maps`, and patchify/unpatchify in exactly the processor's patch order.

Depth enters once: `DepthProcessor` resizes it onto the processor's grid and keeps it as a map (`depth_maps`: each
image's (H', W') map flattened row-major, images concatenated); the model runs the depth branch on those maps and
patchifies its output once, in the processor's order, for F_e2.

Patch order (Qwen2-VL image processor): an image (C, H', W') is cut into p x p patches on a (H'/p, W'/p) grid; rows
of the output run over 2x2 (merge_size) groups of patches in raster order of groups, and inside a group in raster
order; each row holds (C, T, p, p) values, the patch repeated T = temporal_patch_size times. Images of a batch are
concatenated along rows, in order, each described by a (1, H'/p, W'/p) row of `image_grid_thw`.
`tests/test_align.py` checks this against the processor's own `pixel_values`.
"""

from __future__ import annotations

import numpy as np
import torch

from vlm_depth.depth import valid_mask


def processor_grid(height: int, width: int, image_processor) -> tuple[int, int]:
    """(H', W') in pixels that the Qwen2.5-VL `image_processor` resizes a height x width image to (`smart_resize`
    with the processor's min/max pixels and patch_size * merge_size factor)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = image_processor.size
    return smart_resize(
        height,
        width,
        factor=image_processor.patch_size * image_processor.merge_size,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )


def _footprints(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: first input index, footprint length, and output centre in input units.

    The footprint of output cell i is the input pixels whose centres fall inside the cell; when there is none
    (upsampling) it is the single input pixel nearest to the cell centre.
    """
    i = np.arange(n_out, dtype=np.int64)
    # Integer arithmetic: input j is in cell i iff i * n_in <= (j + 0.5) * n_out < (i + 1) * n_in, exactly.
    lo = -((n_out - 2 * i * n_in) // (2 * n_out))
    hi = -((n_out - 2 * (i + 1) * n_in) // (2 * n_out))
    nearest = np.minimum((2 * i + 1) * n_in // (2 * n_out), n_in - 1)
    empty = hi <= lo
    lo = np.where(empty, nearest, lo)
    length = np.where(empty, 1, hi - lo)
    centre = (i + 0.5) * n_in / n_out
    return lo, length, centre


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize depth (h, w) float meters (0 / non-finite = missing) to `size` = (H', W') without inventing values.

    Each output pixel takes, among the input pixels whose centres fall inside it, the valid one nearest to its centre
    (ties: the first in raster order); 0 if none is valid. When an axis is upsampled the footprint is the nearest
    input pixel. So every output value is an input value or 0, and sparse points survive downsampling instead of
    being dropped as plain nearest-neighbour sampling would do. Returns (H', W') float32.
    """
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    out_h, out_w = size
    depth = np.asarray(depth, dtype=np.float32)
    clean = np.where(valid_mask(depth), depth, np.float32(0))
    if clean.shape == (out_h, out_w):
        return clean
    row_lo, row_len, row_centre = _footprints(depth.shape[0], out_h)
    col_lo, col_len, col_centre = _footprints(depth.shape[1], out_w)
    out = np.zeros((out_h, out_w), dtype=np.float32)
    best = np.full((out_h, out_w), np.inf)
    for a in range(int(row_len.max())):
        rows = np.minimum(row_lo + a, depth.shape[0] - 1)
        row_ok = a < row_len
        dr2 = (rows + 0.5 - row_centre) ** 2
        for b in range(int(col_len.max())):
            cols = np.minimum(col_lo + b, depth.shape[1] - 1)
            col_ok = b < col_len
            value = clean[rows[:, None], cols[None, :]]
            dist = dr2[:, None] + ((cols + 0.5 - col_centre) ** 2)[None, :]
            take = row_ok[:, None] & col_ok[None, :] & (value > 0) & (dist < best)
            out[take] = value[take]
            best[take] = dist[take]
    return out


def split_maps(maps: torch.Tensor, grid_thw: torch.Tensor, patch_size: int) -> list[torch.Tensor]:
    """Per-image (H', W') views of `maps`, the images' maps flattened row-major and concatenated (the layout of
    `depth_maps`), on the grids `grid_thw` (n_images, 3) x `patch_size` pixels (1: one value per patch)."""
    sizes = [(int(h) * patch_size, int(w) * patch_size) for _, h, w in grid_thw.tolist()]
    counts = [h * w for h, w in sizes]
    if maps.ndim != 1 or maps.shape[0] != sum(counts):
        raise ValueError(f"maps {tuple(maps.shape)} do not fit grid_thw {grid_thw.tolist()} x {patch_size} px")
    return [part.view(h, w) for part, (h, w) in zip(maps.split(counts), sizes)]


def patchify(x: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """(B, C, H', W') images of one size -> (B * H'/p * W'/p, C * T * p * p) rows in the processor's patch order."""
    batch, channels, height, width = x.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size * merge_size = {factor}")
    gh, gw = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = x.reshape(batch, channels, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return patches.reshape(batch * gh * gw, channels * temporal_patch_size * p * p)


def unpatchify(
    patches: torch.Tensor,
    grid_thw: torch.Tensor,
    channels: int,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
) -> list[torch.Tensor]:
    """Inverse of `patchify` for a processor batch: rows of all images concatenated, `grid_thw` (n_images, 3).

    Returns one (C, H', W') tensor per image, taken from the first temporal copy.
    """
    m, p, t_size = merge_size, patch_size, temporal_patch_size
    row_width = channels * t_size * p * p
    counts = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    if patches.ndim != 2 or patches.shape[1] != row_width or patches.shape[0] != sum(counts):
        raise ValueError(
            f"patches {tuple(patches.shape)} do not fit grid_thw {grid_thw.tolist()} with rows of {row_width}"
        )
    images = []
    for rows, (t, gh, gw) in zip(patches.split(counts), grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"unpatchify handles still images (t = 1), got grid {t}x{gh}x{gw}")
        x = rows.reshape(gh // m, gw // m, m, m, channels, t_size, p, p)[:, :, :, :, :, 0]
        x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, p, gw/m, m, p)
        images.append(x.reshape(channels, gh * p, gw * p))
    return images
