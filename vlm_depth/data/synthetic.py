"""Synthetic RGB-D frames with simulated stereo-sensor failures: the embedded default dataset.

Each frame is a procedural room or street (`synthetic_layout`), ray cast in NumPy (`synthetic_scene`): exact planar
ground-truth depth, a shaded and textured RGB image, intrinsics and a per-pixel material label map. Its sensor depth
comes from simulating an active stereo camera (`synthetic_sensor`): speckle-lit IR views matched by OpenCV's SGBM
with a left-right check, so holes and errors fall where real sensors fail (textureless, specular and transparent
surfaces, occlusion edges, range limits), not at random.

A frame is a pure function of (seed, index): `generate_sample(i, seed)` gives the same bytes in any process, so
training workers can draw frames on the fly. `write_synthetic` (`vlm-depth synth`) writes them in the `folder`
format, and `load("synthetic:N?seed=S")` reads N frames as a dataset without touching the disk.

Material codes of `sample.meta["material"]` ((H, W) uint8): 0 sky / no surface (no ground truth), 1 textured
matte, 2 textureless, 3 specular, 4 transparent (the first surface along the pixel's ray).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, register_reader
from vlm_depth.data.sample import RGBDSample
from vlm_depth.data.synthetic_layout import SCENE_KINDS, make_scene
from vlm_depth.data.synthetic_scene import MATERIAL_NAMES, SKY, shade, trace
from vlm_depth.data.synthetic_sensor import sample_rig, simulate_sensor
from vlm_depth.depth import colorize, depth_range, valid_mask
from vlm_depth.errors import ConfigError
from vlm_depth.files import make_folder

logger = logging.getLogger(__name__)

# Ground truth beyond this distance (far road, horizon) is dropped: it would not fit a millimetre uint16 PNG and no
# benchmark evaluates that far.
MAX_GT_DEPTH = 60.0


# Largest frame side: SGBM and cv2.remap need < 32767 px, and a frame this size already takes minutes to ray cast.
MAX_SIDE = 4096


def _check_size(height: int, width: int) -> None:
    if height < 32 or width < 32:
        raise ConfigError(f"synthetic frames need height and width >= 32 pixels, got {height}x{width}")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ConfigError(
            f"synthetic frames are at most {MAX_SIDE} pixels per side (--height, --width), got {height}x{width}"
        )


def check_synth_options(num: int, height: int, width: int, scene: str, workers: int, seed: int = 0) -> None:
    """ConfigError for options of `write_synthetic` (`vlm-depth synth`) that cannot work, before anything runs."""
    if num < 1:
        raise ConfigError(f"--num must be >= 1, got {num}")
    if scene not in SCENE_KINDS:
        raise ConfigError(f"--scene must be one of {SCENE_KINDS}, got {scene!r}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 = one per CPU core), got {workers}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0 (synthetic streams are indexed by it), got {seed}")
    _check_size(height, width)


def generate_sample(index: int, seed: int, height: int = 240, width: int = 320, scene: str = "mixed") -> RGBDSample:
    """Frame `index` of the synthetic stream `seed`: a deterministic function of its arguments alone.

    Returns an `RGBDSample` with rgb (H, W, 3) uint8, depth = simulated sensor depth (H, W) float32 meters
    (0 = missing), gt = ray-cast planar depth (H, W) float32 meters (0 = sky / beyond MAX_GT_DEPTH), intrinsics,
    and meta {"material": (H, W) uint8 (codes in the module docstring), "scene", "baseline" (m), "sensor_max_range"
    (m), "max_depth" (m)}.
    """
    if index < 0 or seed < 0:
        raise ConfigError(f"synthetic index and seed must be >= 0, got index={index}, seed={seed}")
    _check_size(height, width)
    rng = np.random.default_rng([seed, index])
    scene_, camera, ir_lights = make_scene(rng, scene, height, width)
    left = trace(scene_, camera)
    rgb = _tonemap(shade(left, scene_, scene_.lights, scene_.ambient, scene_.sky), rng).reshape(height, width, 3)
    rig = sample_rig(rng, camera, outdoor=scene_.kind == "street")
    depth, _, _ = simulate_sensor(scene_, left, camera, rig, ir_lights, rng)
    gt = np.where(left.depth <= MAX_GT_DEPTH, left.depth, np.float32(0))
    meta = {
        "material": left.material,
        "scene": scene_.kind,
        "baseline": round(rig.baseline, 6),
        "sensor_max_range": round(rig.max_range, 6),
        "max_depth": MAX_GT_DEPTH,
    }
    return RGBDSample(rgb, depth, gt, camera.intrinsics, name=f"synth_{seed}_{index:06d}", meta=meta)


def _tonemap(linear: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Linear RGB (N, 3) -> uint8 sRGB-like, auto-exposed on the 97th percentile, with mild sensor noise."""
    scale = 0.92 / max(float(np.percentile(linear, 97)), 1e-6)
    noisy = linear * scale + rng.normal(0, 0.006, linear.shape)
    return np.rint(255 * np.clip(noisy, 0, 1) ** (1 / 2.2)).astype(np.uint8)


def iter_samples(
    num: int,
    seed: int,
    height: int = 240,
    width: int = 320,
    scene: str = "mixed",
    start: int = 0,
    workers: int = 1,
) -> Iterator[RGBDSample]:
    """Frames start .. start + num - 1 of the stream `seed` in order (see `generate_sample`).

    workers > 1 generates them in that many processes (forkserver: a script must guard its entry point with
    `if __name__ == "__main__":`); the frames are the same whatever the number of workers.
    """
    for sample, _ in _timed_frames(num, seed, height, width, scene, start, workers):
        yield sample


def _timed_generate(index: int, seed: int, height: int, width: int, scene: str) -> tuple[RGBDSample, float]:
    """`generate_sample` plus the CPU seconds it took in its process (all threads)."""
    cpu = time.process_time()
    sample = generate_sample(index, seed, height, width, scene)
    return sample, time.process_time() - cpu


def _timed_frames(
    num: int, seed: int, height: int, width: int, scene: str, start: int, workers: int
) -> Iterator[tuple[RGBDSample, float]]:
    indices = range(start, start + num)
    if workers <= 1 or num <= 1:
        for index in indices:
            yield _timed_generate(index, seed, height, width, scene)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # forkserver: no fork of a parent that may hold threads (torch, OpenCV) mid-lock.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(min(workers, num), mp_context=context) as pool:
        n = len(indices)
        yield from pool.map(_timed_generate, indices, [seed] * n, [height] * n, [width] * n, [scene] * n)


def missing_counts(sample: RGBDSample) -> dict[str, tuple[int, int]]:
    """(missing, total) ground-truth pixels of a synthetic frame, overall and per material name."""
    has_gt = valid_mask(sample.gt)
    missing = has_gt & ~valid_mask(sample.depth)
    material = sample.meta["material"]
    counts = {"overall": (int(missing.sum()), int(has_gt.sum()))}
    for code, name in MATERIAL_NAMES.items():
        if code != SKY:
            sel = has_gt & (material == code)
            counts[name] = (int((missing & sel).sum()), int(sel.sum()))
    return counts


def missing_rates(counts: Iterable[dict[str, tuple[int, int]]]) -> dict[str, float]:
    """Pool per-frame `missing_counts` into missing rates (fraction of ground-truth pixels; NaN if none)."""
    pooled: dict[str, list[int]] = {}
    for frame in counts:
        for name, (m, n) in frame.items():
            total = pooled.setdefault(name, [0, 0])
            total[0] += m
            total[1] += n
    return {name: (m / n if n else float("nan")) for name, (m, n) in pooled.items()}


@register_reader("synthetic")
class SyntheticDataset(RGBDDataset):
    """`synthetic:N` or `synthetic:N?seed=S&height=H&width=W&scene=room|street|mixed`: N frames generated on access.

    Nothing is read from or written to disk.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        seed: int = 0,
        height: int = 240,
        width: int = 320,
        scene: str = "mixed",
    ) -> None:
        count = str(root)
        if not count.isdigit():
            raise ConfigError(f"synthetic: expected 'synthetic:N?seed=S&height=H&width=W&scene=KIND', got {root!r}")
        split = self.splits[0] if split is None else split
        if split not in self.splits:
            raise ConfigError(f"synthetic: unknown split {split!r}; choose one of {self.splits}")
        if scene not in SCENE_KINDS:
            raise ConfigError(f"synthetic: unknown scene {scene!r}; choose one of {SCENE_KINDS}")
        _check_size(height, width)
        self.seed, self.height, self.width, self.scene = seed, height, width, scene
        self.root, self.split = Path(count), split
        self.items = list(range(int(count)))

    def read(self, item: int) -> RGBDSample:
        return generate_sample(item, self.seed, self.height, self.width, self.scene)


def render_preview(sample: RGBDSample) -> np.ndarray:
    """Side-by-side (H + 16, 5 W, 3) uint8 panel: RGB | GT | sensor depth | |sensor - GT| | material.

    Depths share one turbo colour scale (2-98th percentile of GT); the error scale is 0 (black) to 10 % of that
    range (yellow); missing depth is black.
    """
    import cv2

    gt, depth, material = sample.gt, sample.depth, sample.meta["material"]
    vrange = depth_range(gt)
    error = np.where(valid_mask(gt) & valid_mask(depth), np.abs(depth - gt), 0)
    palette = np.array([[0, 0, 0], [60, 170, 60], [230, 200, 60], [200, 60, 200], [60, 200, 230]], np.uint8)
    panels = {
        "RGB": sample.rgb,
        "GT depth": colorize(gt, vrange),
        "sensor depth": colorize(depth, vrange),
        "|sensor - GT|": colorize(error, (0.0, 0.1 * (vrange[1] - vrange[0])), "inferno"),
        "material": palette[np.minimum(material, len(palette) - 1)],
    }
    row = []
    for title, image in panels.items():
        header = np.full((16, image.shape[1], 3), 255, np.uint8)
        cv2.putText(header, title, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        row.append(np.concatenate([header, image], axis=0))
    return np.concatenate(row, axis=1)


def write_synthetic(
    out: str | Path,
    num: int,
    *,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
    scene: str = "mixed",
    workers: int = 0,
    preview: bool = False,
) -> dict[str, Any]:
    """Write frames 0 .. num - 1 of the stream `seed` (height x width pixels, `scene` layouts) into `out` in the
    folder format, plus `preview.png` of the first frame with `preview`; `workers` processes (0 = one per CPU core;
    the frames do not depend on it). Returns a summary: timings, generation CPU seconds, missing rates."""
    from tqdm.auto import tqdm

    from vlm_depth.data.depth_io import write_rgb
    from vlm_depth.data.folder import write_folder_sample

    check_synth_options(num, height, width, scene, workers, seed)
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    out = make_folder(out)
    start = time.perf_counter()
    counts, cpu_s = [], 0.0
    frames = _timed_frames(num, seed, height, width, scene, 0, workers)
    for index, (sample, cpu) in enumerate(tqdm(frames, total=num, desc="synth")):
        write_folder_sample(out, sample)
        counts.append(missing_counts(sample))
        cpu_s += cpu
        if preview and index == 0:
            preview_path = write_rgb(out / "preview.png", render_preview(sample))
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "out": str(out),
        "num": num,
        "seed": seed,
        "size": [height, width],
        "elapsed_s": round(elapsed, 2),
        "s_per_frame": round(elapsed / num, 3),
        "workers": workers,
        # CPU time of the generation (all processes and threads): elapsed time on idle cores, whatever the load
        "generation_cpu_s": round(cpu_s, 2),
        # null for a material absent from every frame
        "missing_rate": {k: (round(v, 4) if v == v else None) for k, v in missing_rates(counts).items()},
    }
    if preview:
        summary["preview"] = str(preview_path)
    logger.info("synth: %d frames in %.1f s", num, elapsed)
    return summary
