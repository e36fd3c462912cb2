"""The one place where depth, RGB and camera files are read and written; depth leaves here as float32 meters.

Encodings: integer images (16-bit PNG/TIFF) hold `meters * scale` (1000 for millimetres, 256 for KITTI/VOID,
5000 for TUM, 100 for Virtual KITTI 2), 0 = no measurement; `.npy` and HDF5 hold float meters (integer arrays there
are divided by `scale` like PNGs). 8-bit and 3-channel "depth" images are refused: they are visualisations, not
measurements.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import h5py
import numpy as np

from vlm_depth.data.sample import Intrinsics
from vlm_depth.depth import sanitize_depth, valid_mask
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.files import atomic_path, atomic_write

UINT16_MAX = 65535
# A depth map whose median is this far is more likely integer units read with the wrong scale than a real scene
# (KITTI's median is ~15 m; sky and far road stay out of the sparse/GT maps or are a minority of pixels).
SUSPICIOUS_MEDIAN_M = 100.0

SCALE_HINT = "units per meter: 1000 for millimetres, 256 for KITTI/VOID, 5000 for TUM, 100 for Virtual KITTI 2"

logger = logging.getLogger(__name__)
_warned_scales: set[float] = set()  # one unit warning per scale, not one per frame of a dataset
HDF5_SUFFIXES = (".h5", ".hdf5")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"file not found: {path}")


def check_depth_scale(scale: object, what: str = "depth_scale") -> float:
    """`scale` (units per meter of integer depth) as a float; ConfigError naming `what` unless it is a finite number
    > 0 (an infinite scale would turn every depth into 0, i.e. silently monocular)."""
    number = isinstance(scale, (int, float, np.number)) and not isinstance(scale, bool)
    if not number or not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{what} must be a finite number > 0 ({SCALE_HINT}), got {scale!r}")
    return float(scale)


def _integer_to_meters(values: np.ndarray, scale: float | None, path: Path) -> np.ndarray:
    if scale is None:
        raise ConfigError(f"{path}: integer depth ({values.dtype}) needs a scale ({SCALE_HINT})")
    scale = check_depth_scale(scale, f"{path}: the depth scale (--depth_scale)")
    meters = (values.astype(np.float64) / scale).astype(np.float32)
    measured = meters[meters > 0]
    if scale not in _warned_scales and measured.size and (median := float(np.median(measured))) > SUSPICIOUS_MEDIAN_M:
        _warned_scales.add(scale)
        logger.warning(
            "%s: integer depth / depth_scale %g has a median of %.0f m: is the scale right? (%s)",
            path,
            scale,
            median,
            SCALE_HINT,
        )
    return meters


def array_to_meters(values: np.ndarray, scale: float | None, path: Path | str) -> np.ndarray:
    """A depth array as stored (float meters, or integers = meters * `scale`) -> (H, W) float32 meters; `path`
    names the source in errors."""
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise DataError(f"{path}: depth must be a single (H, W) map, got shape {values.shape}")
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        return _integer_to_meters(values, scale, path)
    raise DataError(f"{path}: unsupported depth dtype {values.dtype}")


def _check_whole_jpeg(path: Path) -> None:
    """DataError for a truncated JPEG, which cv2 decodes with the missing part grey (libjpeg only warns on stderr).
    A JPEG that does not end with its end-of-image marker is decoded again by PIL, which refuses truncated data."""
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(max(path.stat().st_size - 2, 0))
        tail = f.read(2)
    if head != b"\xff\xd8" or tail == b"\xff\xd9":
        return
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: truncated or corrupt image ({err})") from err


def _imread(path: Path) -> np.ndarray:
    """The image file as stored (bit depth and channels unchanged, BGR order); DataError naming the file."""
    _require_file(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path}: cannot decode the image (not an image, or a damaged one)")
    _check_whole_jpeg(path)
    return image


def _read_depth_image(path: Path, scale: float | None) -> np.ndarray:
    image = _imread(path)
    if image.ndim == 3 and image.shape[2] > 1:
        raise DataError(
            f"{path}: depth image has {image.shape[2]} channels; a colour(-mapped) image is a visualisation, "
            "not a depth measurement (expected a single-channel 16-bit image)"
        )
    if image.dtype == np.uint8:
        raise DataError(
            f"{path}: depth image is 8-bit; 8 bits cannot hold metric depth (a visualisation?). "
            "Expected a 16-bit image (e.g. millimetres) or a float32 .npy in meters"
        )
    return array_to_meters(image, scale, path)


def _read_depth_hdf5(path: Path, scale: float | None, key: str | None) -> np.ndarray:
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        if key is None:
            names = [name for name, item in f.items() if isinstance(item, h5py.Dataset)]
            if len(names) != 1:
                raise DataError(f"{path}: {len(names)} top-level datasets {names}; say which with key=")
            key = names[0]
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"{path}: no dataset {key!r}")
        values = f[key][()]
    return array_to_meters(np.asarray(values), scale, path)


def read_npy(path: str | Path) -> np.ndarray:
    """Load a plain `.npy` array; object arrays (pickles) are refused, never unpickled."""
    path = Path(path)
    _require_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise DataError(f"{path}: empty or damaged .npy file ({exc})") from exc


def read_depth(path: str | Path, scale: float | None = None, key: str | None = None) -> np.ndarray:
    """Read a depth map as (H, W) float32 meters, 0 = missing (NaN/inf are kept; `RGBDSample` masks them and
    refuses values that are not plausible meters).

    path: a 16-bit PNG/TIFF (value / `scale`), a `.npy` (float meters; allow_pickle=False) or an HDF5 file
    (dataset `key`, default: the file's only top-level dataset). `scale` (units per meter) is required for integer
    encodings and unused for float ones.
    """
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        depth = _read_depth_image(path, scale)
    elif suffix == ".npy":
        depth = array_to_meters(read_npy(path), scale, path)
    elif suffix in HDF5_SUFFIXES:
        depth = _read_depth_hdf5(path, scale, key)
    else:
        raise DataError(f"{path}: unknown depth file type {suffix!r} (expected .png, .tif, .npy, .h5/.hdf5)")
    return depth


def read_raw_float32(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a headerless little-endian float32 buffer of `shape` (e.g. ETH3D depth files) as float32 meters."""
    path = Path(path)
    _require_file(path)
    values = np.fromfile(path, dtype="<f4")
    if values.size != shape[0] * shape[1]:
        raise DataError(f"{path}: {values.size} float32 values, expected {shape[0]}x{shape[1]}")
    return values.reshape(shape).astype(np.float32)


def depth_to_uint16(depth_m: np.ndarray, scale: float, what: str = "depth") -> np.ndarray:
    """(H, W) float meters -> uint16 `round(depth * scale)`; 0/NaN/inf/negative -> 0, tiny positives -> 1.

    Raises DataError if a value would exceed 65535 (choose a smaller scale) rather than wrapping or clipping it.
    """
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if depth_m.ndim != 2:
        raise DataError(f"{what}: depth must have shape (H, W), got {depth_m.shape}")
    if not scale > 0:
        raise ConfigError(f"{what}: depth scale must be > 0, got {scale}")
    valid = valid_mask(depth_m)
    codes = np.zeros(depth_m.shape, dtype=np.float64)
    codes[valid] = np.rint(depth_m[valid] * scale)
    if valid.any() and codes.max() > UINT16_MAX:
        raise DataError(
            f"{what}: max depth {depth_m[valid].max():.3f} m x scale {scale} exceeds the uint16 range "
            f"({UINT16_MAX / scale:.3f} m); use a smaller depth scale or .npy"
        )
    codes[valid] = np.maximum(codes[valid], 1)  # a measured point must stay a measurement
    return codes.astype(np.uint16)


def _write_image(path: Path, image: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise DataError(f"{path}: could not write the image")
    return path


def write_depth_png(path: str | Path, depth_m: np.ndarray, scale: float = 1000.0) -> Path:
    """Write (H, W) float meters as a uint16 PNG holding `round(depth * scale)` (see `depth_to_uint16`)."""
    path = Path(path)
    return _write_image(path, depth_to_uint16(depth_m, scale, what=str(path)))


def write_depth_npy(path: str | Path, depth_m: np.ndarray) -> Path:
    """Write (H, W) depth as float32 meters to `.npy` (non-finite/negative values stored as 0)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        np.save(tmp, sanitize_depth(np.asarray(depth_m, dtype=np.float32), str(path)), allow_pickle=False)
    return path


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an 8-bit image as (H, W, 3) uint8 RGB (grayscale is replicated, alpha dropped, EXIF rotation ignored)."""
    path = Path(path)
    image = _imread(path)
    if image.dtype != np.uint8:
        raise DataError(f"{path}: RGB image must be 8-bit, got {image.dtype} (a depth map passed as RGB?)")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise DataError(f"{path}: unsupported number of channels {image.shape[2]}")


def write_rgb(path: str | Path, rgb: np.ndarray) -> Path:
    """Write (H, W, 3) uint8 RGB to an image file (PNG is lossless)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{path}: rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    return _write_image(Path(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel 8/16-bit label or mask image (e.g. material ids) as (H, W) integers."""
    path = Path(path)
    image = _imread(path)
    if image.ndim != 2:
        raise DataError(f"{path}: a label map must be single-channel, got shape {image.shape}")
    return image


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Write a (H, W) uint8 or uint16 label/mask map as PNG (lossless)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: labels must be (H, W) uint8/uint16, got {labels.dtype} {labels.shape}")
    return _write_image(Path(path), labels)


def _numbers_in_text(path: Path) -> np.ndarray:
    """All numbers of the lines of a text file that consist only of numbers (header/comment lines are skipped)."""
    values: list[float] = []
    for line in path.read_text(errors="replace").splitlines():
        tokens = line.replace(",", " ").split()
        try:
            values += [float(t) for t in tokens]
        except ValueError:
            continue
    return np.asarray(values, dtype=np.float64)


def intrinsics_from_matrix(values: np.ndarray, source: str) -> Intrinsics:
    """(fx, fy, cx, cy) from 4 numbers (fx fy cx cy) or a row-major 3x3 K, 3x4 P or 4x4 matrix."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 4:
        fx, fy, cx, cy = values
    elif values.size in (9, 12, 16):
        k = values.reshape(-1, 3 if values.size == 9 else 4)
        fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    else:
        raise DataError(f"{source}: expected fx fy cx cy or a 3x3/3x4/4x4 camera matrix, got {values.size} numbers")
    return (float(fx), float(fy), float(cx), float(cy))


def read_intrinsics(path: str | Path) -> Intrinsics:
    """Read (fx, fy, cx, cy) in pixels from `.json` ({"fx","fy","cx","cy"}), `.npy` (3x3 K) or a text file.

    Text files may hold `fx fy cx cy` or a row-major 3x3 K / 3x4 P / 4x4 matrix; non-numeric header lines are skipped.
    """
    path = Path(path)
    _require_file(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object with fx, fy, cx, cy in pixels, got {data!r:.40}")
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in data]
        if missing:
            raise DataError(f"{path}: intrinsics json lacks {missing} (expected keys fx, fy, cx, cy in pixels)")
        for key in ("fx", "fy", "cx", "cy"):
            if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
                raise DataError(f"{path}: {key} must be a number of pixels, got {data[key]!r}")
        return (float(data["fx"]), float(data["fy"]), float(data["cx"]), float(data["cy"]))
    if path.suffix.lower() == ".npy":
        return intrinsics_from_matrix(read_npy(path), str(path))
    return intrinsics_from_matrix(_numbers_in_text(path), str(path))


def write_intrinsics_json(path: str | Path, intrinsics: Intrinsics) -> Path:
    """Write (fx, fy, cx, cy) in pixels as `{"fx": .., "fy": .., "cx": .., "cy": ..}`."""
    return atomic_write(path, json.dumps(dict(zip(("fx", "fy", "cx", "cy"), map(float, intrinsics)))) + "\n")
