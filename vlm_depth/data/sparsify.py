"""Sparsity protocols: turn dense or semi-dense ground truth into the sparse depth input a benchmark or a training
recipe asks for, from a spec string such as `uniform:500`, `lidar:64`, `blocks:hard` or `uniform:2150+noise:0.05`.

Every protocol is deterministic given `seed`, reads only valid GT pixels (`vlm_depth.depth.valid_mask`) and returns
float32 meters with 0 = missing. All of them except `noise` and `blocks` (whose definition includes value noise)
return a subset of the GT with the kept values unchanged. Parameters and the reasoning: `docs/protocols.md`.

`sparse_input` is the one way a frame becomes the input of a method (training collator and evaluation runner alike),
and `image_seed` the one rule that derives a frame's seed from a run seed and the frame's index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError

PROTOCOL_FORMS = (
    "uniform:N (N points at full density, scaled by the valid fraction, min 5)",
    "density:P or density:LO~HI (share P of the valid pixels; a range draws P log-uniformly)",
    "lidar:L or lidar:L:DOWN:UP (L scan lines; elevation range in degrees, default the camera's vertical FOV)",
    "sfm:sift or sfm:orb (OpenCV keypoints of the RGB)",
    "blocks:easy|medium|hard|extreme (block holes + Gaussian and shot noise)",
    "perlin:P (share P of the valid pixels kept in Perlin-noise blobs)",
    "noise:P (share P of the valid points replaced by uniform random depth)",
    "sensor (the dataset's raw sensor depth as-is)",
    "any of the above but noise followed by +noise:P",
)


@dataclass(frozen=True)
class BlockSeverity:
    """One level of the `blocks` protocol: image share covered by holes, relative Gaussian sigma, shot-noise rate."""

    coverage: float
    sigma: float
    shot: float


# Our reading of LingBot-Depth's block protocol (the exact numbers are not published with the code): holes grow
# roughly geometrically and the noise doubles per level, so each level is clearly harder than the one before.
BLOCK_SEVERITIES: dict[str, BlockSeverity] = {
    "easy": BlockSeverity(coverage=0.10, sigma=0.005, shot=0.01),
    "medium": BlockSeverity(coverage=0.25, sigma=0.01, shot=0.03),
    "hard": BlockSeverity(coverage=0.45, sigma=0.02, shot=0.06),
    "extreme": BlockSeverity(coverage=0.70, sigma=0.04, shot=0.10),
}
BLOCK_SIDE = (0.05, 0.30)  # block height/width as a share of the image height/width, uniform
LIDAR_AZIMUTH_STEP_DEG = 0.17  # HDL-64E azimuth resolution at 10 Hz (KITTI)
PERLIN_OCTAVES = 4
PERLIN_PERIOD = (0.15, 0.5)  # coarsest Perlin period as a share of the longer image side, uniform
NOISE_PERCENTILES = (10.0, 90.0)  # OMNI-DC draws replacement depths uniformly between these GT percentiles
UNIFORM_MIN_POINTS = 5
SFM_DETECTORS = ("sift", "orb")

# Independent random streams per ingredient, so e.g. a harder `blocks` level reuses the easier level's holes.
_STREAM_POINTS, _STREAM_DENSITY, _STREAM_BLOCKS, _STREAM_SHOT, _STREAM_GAUSS, _STREAM_NOISE, _STREAM_PERLIN = range(7)


@dataclass(frozen=True)
class Protocol:
    """A parsed sparsity protocol. `params` depend on `kind`; `noise` is the share of the `+noise:P` suffix."""

    kind: str
    params: tuple[float | str, ...] = ()
    noise: float = 0.0

    @property
    def spec(self) -> str:
        """Canonical spec string (parses back to an equal Protocol)."""
        if self.kind == "density" and len(self.params) == 2:
            base = f"density:{self.params[0]:g}~{self.params[1]:g}"
        else:
            base = ":".join([self.kind, *(f"{p:g}" if isinstance(p, float) else str(p) for p in self.params)])
        return f"{base}+noise:{self.noise:g}" if self.noise else base

    def __str__(self) -> str:
        return self.spec


def _bad(spec: str, why: str) -> ConfigError:
    forms = "\n  ".join(PROTOCOL_FORMS)
    return ConfigError(f"bad sparsity protocol {spec!r}: {why}. Valid forms:\n  {forms}")


def _number(spec: str, text: str, what: str, low: float, high: float, integer: bool = False) -> float | int:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise _bad(spec, f"{what} must be {'an integer' if integer else 'a number'}, got {text!r}") from None
    if not (low <= value <= high) or (not integer and not math.isfinite(value)):
        raise _bad(spec, f"{what} must be in [{low}, {high}], got {text}")
    return value


def _share(spec: str, text: str) -> float:
    value = _number(spec, text, "share P", 0.0, 1.0)
    if value == 0.0:
        raise _bad(spec, "share P must be > 0")
    return value


def _parse_base(spec: str, part: str) -> Protocol:
    kind, *args = part.strip().split(":")
    kind = kind.strip().lower()
    if kind == "sensor" and not args:
        return Protocol("sensor")
    if kind == "uniform" and len(args) == 1:
        return Protocol("uniform", (_number(spec, args[0], "N", 1, 10**9, integer=True),))
    if kind == "density" and len(args) == 1:
        if "~" in args[0]:
            low, high = (_share(spec, t) for t in args[0].split("~", 1))
            if low > high:
                raise _bad(spec, "density range LO~HI needs LO <= HI")
            return Protocol("density", (low, high))
        return Protocol("density", (_share(spec, args[0]),))
    if kind == "lidar" and len(args) in (1, 3):
        lines = _number(spec, args[0], "L", 1, 10_000, integer=True)
        if len(args) == 1:
            return Protocol("lidar", (lines,))
        down, up = (_number(spec, t, "elevation (degrees)", -89.0, 89.0) for t in args[1:])
        if down >= up:
            raise _bad(spec, "lidar elevation range DOWN:UP needs DOWN < UP")
        return Protocol("lidar", (lines, down, up))
    if kind == "sfm" and len(args) == 1 and args[0].lower() in SFM_DETECTORS:
        return Protocol("sfm", (args[0].lower(),))
    if kind == "blocks" and len(args) == 1 and args[0].lower() in BLOCK_SEVERITIES:
        return Protocol("blocks", (args[0].lower(),))
    if kind == "perlin" and len(args) == 1:
        return Protocol("perlin", (_share(spec, args[0]),))
    if kind == "noise" and len(args) == 1:
        return Protocol("noise", (_number(spec, args[0], "share P", 0.0, 1.0),))
    raise _bad(spec, f"unknown protocol or wrong number of arguments in {part.strip()!r}")


def parse_protocol(spec: str) -> Protocol:
    """Parse a protocol spec (see `PROTOCOL_FORMS`); a malformed spec raises ConfigError listing the valid forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty spec")
    base, *mods = spec.split("+")
    protocol = _parse_base(spec, base)
    if not mods:
        return protocol
    if len(mods) > 1 or protocol.kind == "noise":
        raise _bad(spec, "only one +noise:P suffix is allowed, after a protocol other than noise")
    modifier = _parse_base(spec, mods[0])
    if modifier.kind != "noise":
        raise _bad(spec, "only noise:P can follow '+'")
    return Protocol(protocol.kind, protocol.params, float(modifier.params[0]))


def sparsify(
    spec: str | Protocol,
    gt: np.ndarray,
    *,
    rgb: np.ndarray | None = None,
    intrinsics: tuple[float, float, float, float] | None = None,
    sensor: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sparse depth input (H, W) float32 meters, 0 = missing, drawn from `gt` (H, W) meters by a protocol.

    `rgb` (H, W, 3) uint8 is needed by `sfm:*`; `intrinsics` (fx, fy, cx, cy) in pixels by `lidar:*` (without
    them a virtual camera with fx = fy = H at the image centre is used, as OMNI-DC does); `sensor` (H, W) meters by
    `sensor`. The same `seed` gives the same output.
    """
    protocol = parse_protocol(spec) if isinstance(spec, str) else spec
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise DataError(f"ground truth must be (H, W) depth in meters, got shape {gt.shape}")
    valid = valid_mask(gt)
    clean = np.where(valid, gt, 0).astype(np.float32)
    if protocol.kind == "sensor":
        out = _sensor(sensor, gt.shape)
    elif protocol.kind == "noise":
        out = clean
    else:
        keep = _KEEP[protocol.kind](protocol, valid, rgb=rgb, intrinsics=intrinsics, seed=seed)
        out = np.where(keep & valid, clean, np.float32(0))
        if protocol.kind == "blocks":
            out = _gaussian(out, BLOCK_SEVERITIES[protocol.params[0]].sigma, seed)
    share = protocol.params[0] if protocol.kind == "noise" else protocol.noise
    if share:
        reference = clean[valid] if valid.any() else out[valid_mask(out)]
        out = _replace_with_noise(out, reference, float(share), seed)
    return out


def image_seed(seed: int, index: int, *streams: int) -> int:
    """The seed of frame `index` of a run seeded with `seed` (optionally of a sub-stream): the same for every method
    and process, independent across frames."""
    return int(np.random.SeedSequence([seed, index, *streams]).generate_state(1)[0])


def sparse_input(
    protocol: str,
    rgb: np.ndarray,
    depth: np.ndarray,
    gt: np.ndarray | None,
    intrinsics: tuple[float, float, float, float] | None,
    seed: int,
) -> np.ndarray:
    """The sparse input (H, W) float32 meters of one frame under `protocol`, all arrays on one pixel grid.

    depth: the frame's sensor depth (H, W) meters; gt: its ground truth or None; `gt is depth` marks a dataset whose
    depth is the ground truth itself. `sensor` returns the sensor depth; any other protocol samples the ground truth
    (or, without a separate one, the depth), with `seed`.
    """
    depth_is_gt = gt is not None and gt is depth
    return sparsify(
        protocol,
        depth if gt is None else gt,
        rgb=rgb,
        intrinsics=intrinsics,
        sensor=None if depth_is_gt else depth,
        seed=seed,
    )


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), stream))


def _choose(valid: np.ndarray, count: int, seed: int) -> np.ndarray:
    idx = np.flatnonzero(valid)
    keep = np.zeros(valid.shape, dtype=bool)
    keep.flat[_rng(seed, _STREAM_POINTS).choice(idx, size=min(count, idx.size), replace=False)] = True
    return keep


def _uniform(protocol: Protocol, valid: np.ndarray, seed: int, **_) -> np.ndarray:
    # OMNI-DC's density matching: N is the count at full coverage, so sparser GT gets proportionally fewer points.
    count = max(round(int(valid.sum()) * int(protocol.params[0]) / valid.size), UNIFORM_MIN_POINTS)
    return _choose(valid, count, seed)


def _density(protocol: Protocol, valid: np.ndarray, seed: int, **_) -> np.ndarray:
    share = protocol.params[0]
    if len(protocol.params) == 2:
        low, high = protocol.params
        share = math.exp(_rng(seed, _STREAM_DENSITY).uniform(math.log(low), math.log(high)))
    return _choose(valid, max(round(share * int(valid.sum())), 1), seed)


def lidar_pixels(
    shape: tuple[int, int],
    lines: int,
    intrinsics: tuple[float, float, float, float] | None = None,
    elevation_deg: tuple[float, float] | None = None,
    azimuth_step_deg: float = LIDAR_AZIMUTH_STEP_DEG,
) -> np.ndarray:
    """Pixels (H, W) bool hit by a synthetic `lines`-beam LiDAR at the camera centre, looking along the optical axis.

    Beams are evenly spaced in elevation over `elevation_deg` = (down, up) (default: the camera's vertical field of
    view at the principal point) and fire every `azimuth_step_deg`. A beam at elevation e and azimuth a lands at
    u = cx + fx tan(a), v = cy - fy tan(e) / cos(a): scan lines curve away from the horizon like a real scan.
    """
    height, width = shape
    fx, fy, cx, cy = intrinsics if intrinsics is not None else (height, height, (width - 1) / 2, (height - 1) / 2)
    if elevation_deg is None:
        down, up = -math.atan((height - 1 - cy) / fy), math.atan(cy / fy)
    else:
        down, up = (math.radians(e) for e in elevation_deg)
    elevations = np.linspace(down, up, lines) if lines > 1 else np.array([(down + up) / 2])
    az_low, az_high = math.atan((-0.5 - cx) / fx), math.atan((width - 0.5 - cx) / fx)
    azimuths = np.arange(az_low, az_high, math.radians(azimuth_step_deg))
    u = np.rint(cx + fx * np.tan(azimuths))[None, :].repeat(elevations.size, 0)
    v = np.rint(cy - fy * np.tan(elevations)[:, None] / np.cos(azimuths)[None, :])
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    hit = np.zeros(shape, dtype=bool)
    hit[v[inside].astype(int), u[inside].astype(int)] = True
    return hit


def _lidar(protocol: Protocol, valid: np.ndarray, intrinsics, **_) -> np.ndarray:
    lines, *elevation = protocol.params
    return lidar_pixels(valid.shape, int(lines), intrinsics, tuple(elevation) if elevation else None)


def _sfm(protocol: Protocol, valid: np.ndarray, rgb: np.ndarray | None, **_) -> np.ndarray:
    import cv2

    if rgb is None:
        raise ConfigError(f"protocol {protocol.spec} detects keypoints in the RGB image; pass rgb=")
    rgb = np.asarray(rgb)
    if rgb.shape != (*valid.shape, 3) or rgb.dtype != np.uint8:
        raise DataError(f"rgb must be {(*valid.shape, 3)} uint8 to match the depth, got {rgb.shape} {rgb.dtype}")
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if protocol.params[0] == "sift":
        detector = cv2.SIFT.create()
    else:  # as OMNI-DC: every FAST corner ORB finds
        detector = cv2.ORB.create(nfeatures=100000, scoreType=cv2.ORB_FAST_SCORE)
    try:
        keypoints = detector.detect(gray, None)
    except cv2.error as exc:
        raise DataError(f"{protocol.spec}: OpenCV cannot detect keypoints in a {gray.shape} image ({exc})") from exc
    points = np.array([kp.pt for kp in keypoints], dtype=np.float64).reshape(-1, 2)
    keep = np.zeros(valid.shape, dtype=bool)
    cols = np.clip(np.rint(points[:, 0]), 0, valid.shape[1] - 1).astype(int)
    rows = np.clip(np.rint(points[:, 1]), 0, valid.shape[0] - 1).astype(int)
    keep[rows, cols] = True
    return keep


def block_holes(shape: tuple[int, int], coverage: float, seed: int) -> np.ndarray:
    """Rectangular holes (H, W) bool covering at least `coverage` of the image; sides uniform in `BLOCK_SIDE` of
    the image size. Blocks come from one random stream per seed, so a larger coverage adds blocks to a smaller one's.
    """
    height, width = shape
    rng = _rng(seed, _STREAM_BLOCKS)
    holes = np.zeros(shape, dtype=bool)
    while holes.mean() < coverage:
        bh = max(1, round(rng.uniform(*BLOCK_SIDE) * height))
        bw = max(1, round(rng.uniform(*BLOCK_SIDE) * width))
        top, left = rng.integers(0, height - bh + 1), rng.integers(0, width - bw + 1)
        holes[top : top + bh, left : left + bw] = True
    return holes


def _blocks(protocol: Protocol, valid: np.ndarray, seed: int, **_) -> np.ndarray:
    level = BLOCK_SEVERITIES[protocol.params[0]]
    shot = _rng(seed, _STREAM_SHOT).random(valid.shape) < level.shot
    return ~(block_holes(valid.shape, level.coverage, seed) | shot)


def _gaussian(depth: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    # Truncated at 3 sigma so a relative sigma < 1/3 can never flip a depth's sign.
    factor = 1.0 + sigma * np.clip(_rng(seed, _STREAM_GAUSS).standard_normal(depth.shape), -3.0, 3.0)
    return (depth * factor).astype(np.float32)


def perlin_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Fractal Perlin gradient noise (H, W) float64: `PERLIN_OCTAVES` octaves, each half the period and amplitude."""
    height, width = shape
    period = rng.uniform(*PERLIN_PERIOD) * max(height, width)
    total = np.zeros(shape)
    for octave in range(PERLIN_OCTAVES):
        total += 0.5**octave * _perlin_octave(shape, max(period / 2**octave, 2.0), rng)
    return total


def _perlin_octave(shape: tuple[int, int], period: float, rng: np.random.Generator) -> np.ndarray:
    height, width = shape
    ys, xs = np.arange(height) / period, np.arange(width) / period
    angles = rng.uniform(0, 2 * np.pi, (int(ys[-1]) + 2, int(xs[-1]) + 2))
    gy, gx = np.sin(angles), np.cos(angles)
    y0, x0 = np.floor(ys).astype(int)[:, None], np.floor(xs).astype(int)[None, :]
    fy, fx = (ys[:, None] - y0), (xs[None, :] - x0)

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[y0 + dy, x0 + dx] * (fy - dy) + gx[y0 + dy, x0 + dx] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return top * (1 - wy) + bottom * wy


def _perlin(protocol: Protocol, valid: np.ndarray, seed: int, **_) -> np.ndarray:
    noise = perlin_noise(valid.shape, _rng(seed, _STREAM_PERLIN))
    idx = np.flatnonzero(valid)
    count = min(max(round(protocol.params[0] * idx.size), 1), idx.size)
    keep = np.zeros(valid.shape, dtype=bool)
    keep.flat[idx[np.argsort(-noise.flat[idx], kind="stable")[:count]]] = True
    return keep


def _sensor(sensor: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if sensor is None:
        raise ConfigError("protocol `sensor` uses the dataset's raw sensor depth, but this sample has none")
    sensor = np.asarray(sensor)
    if sensor.shape != shape:
        raise DataError(f"sensor depth has shape {sensor.shape}, the ground truth {shape}")
    return np.where(valid_mask(sensor), sensor, 0).astype(np.float32)


def _replace_with_noise(depth: np.ndarray, reference: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Replace round(share * points) valid points of `depth` by depths drawn uniformly between the
    `NOISE_PERCENTILES` of `reference` (the valid GT values), as OMNI-DC's noise protocol does."""
    idx = np.flatnonzero(valid_mask(depth))
    if idx.size == 0:
        return depth
    rng = _rng(seed, _STREAM_NOISE)
    chosen = rng.choice(idx, size=min(round(share * idx.size), idx.size), replace=False)
    low, high = np.percentile(reference, NOISE_PERCENTILES)
    out = depth.copy()
    out.flat[chosen] = rng.uniform(low, high, chosen.size).astype(np.float32)
    return out


_KEEP = {
    "uniform": _uniform,
    "density": _density,
    "lidar": _lidar,
    "sfm": _sfm,
    "blocks": _blocks,
    "perlin": _perlin,
}
