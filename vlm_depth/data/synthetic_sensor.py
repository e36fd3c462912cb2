"""Simulated active-stereo depth camera: speckle projector, two rectified IR cameras, OpenCV semi-global matching.

The left IR camera *is* the RGB camera (depth registered to RGB, as RealSense-style sensors deliver it), the right one
sits `baseline` meters to its right, and a dot projector between them lights the scene with a random speckle pattern.
Both IR images are rendered from the same scene with their own ray casts (`synthetic_scene.trace`), so every failure
comes from the physics: the speckle washes out on textureless paints and at long range or in sunlight, specular
surfaces mirror the pattern of other surfaces (a wrong, too-far match) and saturate in highlights, glass refracts
the background (background depth, or views that disagree), occlusions and projector shadows leave one view without
a match. `cv2.StereoSGBM` with its uniqueness and speckle filters, a full left-right consistency check (a second
SGBM pass on the mirrored pair), a texture test against the expected camera noise and the device's range limits
turn these into holes; what survives carries SGBM's edge fattening, pixel locking and disparity quantisation (1/32
pixel), and depth is rounded to 1 mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from vlm_depth.data.synthetic_scene import Camera, Light, MipMap, Scene, Trace, shade, trace

DEPTH_RESOLUTION_M = 0.001
# Reference width of the SGBM settings below; disparity search and speckle sizes scale with the image.
REFERENCE_WIDTH = 320


@dataclass(frozen=True)
class StereoRig:
    """An active stereo camera. baseline, projector_offset, max_range in meters; pattern: the projected dots in [0, 1].

    projector_power: irradiance of the pattern at 1 m relative to `ambient_ir`; read_noise and shot_noise in 8-bit
    digital numbers (shot: per sqrt(DN)); texture_snr: smallest ratio of the local standard deviation of the left IR
    image to the expected noise there that the sensor trusts.
    """

    baseline: float
    projector_offset: float
    projector_power: float
    ambient_ir: float
    pattern: MipMap
    max_range: float
    read_noise: float = 1.2
    shot_noise: float = 0.25
    texture_snr: float = 1.5
    block_size: int = 5
    uniqueness_ratio: int = 10


def speckle_pattern(rng: np.random.Generator, height: int, width: int, density: float = 0.18) -> np.ndarray:
    """Random dot pattern (height, width) float32 in [0, 1]: dots of random brightness, slightly blurred."""
    dots = (rng.random((height, width)) < density) * rng.uniform(0.5, 1.0, (height, width))
    blurred = cv2.GaussianBlur(dots.astype(np.float32), (0, 0), 1.0)
    return blurred / blurred.max()


def sample_rig(rng: np.random.Generator, camera: Camera, outdoor: bool) -> StereoRig:
    """Draw a device: baseline 0.05-0.2 m (as LingBot-Depth samples it), projector, noise and range limits."""
    baseline = float(rng.uniform(0.05, 0.2))
    pattern_hw = (int(np.ceil(camera.height * 1.3)), int(np.ceil(camera.width * 1.3)))
    return StereoRig(
        baseline=baseline,
        projector_offset=float(baseline * rng.uniform(0.3, 0.7)),
        projector_power=float(rng.uniform(6.0, 14.0)),
        ambient_ir=float(rng.uniform(0.5, 1.0) if outdoor else rng.uniform(0.1, 0.4)),
        pattern=MipMap.build(speckle_pattern(rng, *pattern_hw), wrap=False),
        # Indoor presets trust 6-12 m; outdoors the sun's texture lets the same camera work further.
        max_range=float(rng.uniform(10.0, 20.0) if outdoor else rng.uniform(6.0, 12.0)),
    )


def projector_light(rig: StereoRig, camera: Camera) -> Light:
    """The speckle projector as a point light whose irradiance is modulated by the pattern it projects."""
    h, w = rig.pattern.shape[:2]
    # Projector optics: the same viewing direction as the cameras, a field of view 1.3x wider.
    position = camera.shifted(rig.projector_offset).position
    projector = Camera(position, camera.rotation, camera.fx, camera.fy, (w - 1) / 2, (h - 1) / 2, h, w)

    def pattern(points: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        x, y, z = projector.project(points)
        with np.errstate(divide="ignore", invalid="ignore"):
            dots_per_pixel = footprint * projector.fx / z
        values = rig.pattern.sample(np.stack([x, y], axis=1), np.where(z > 0, dots_per_pixel, 1.0))[:, 0]
        return np.where(z > 0, values, 0.0)

    return Light(
        color=np.full(3, rig.projector_power),
        position=position,
        pattern=pattern,
        pattern_mean=float(rig.pattern.levels[0].mean()),
    )


def render_ir_pair(
    scene: Scene, left: Trace, camera: Camera, rig: StereoRig, sun: list[Light], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right 8-bit IR images (H, W) uint8 with auto exposure, shot + read noise and saturation.

    left: the trace of `camera` already used for the RGB image. sun: lights that also emit near infrared.
    """
    lights = [projector_light(rig, camera), *sun]
    ambient = np.full(3, rig.ambient_ir)

    def sky(dirs: np.ndarray) -> np.ndarray:
        return np.broadcast_to(ambient * 0.8, dirs.shape)

    right = trace(scene, camera.shifted(rig.baseline))
    images = [shade(t, scene, lights, ambient, sky, grey=True)[:, 0] for t in (left, right)]
    gain = 150.0 / max(float(np.percentile(images[0], 90)), 1e-6)
    out = []
    for image in images:
        signal = gain * image.reshape(camera.height, camera.width)
        sigma = np.sqrt(rig.read_noise**2 + rig.shot_noise**2 * signal)
        noisy = signal + sigma * rng.standard_normal(signal.shape)
        out.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return out[0], out[1]


# SGBM locks its sub-pixel disparities towards integers (errors up to ~0.2 px); matching a 2x horizontally
# interpolated pair halves that to the ~0.1 px that active-stereo sensors specify.
UPSAMPLE = 2


def _num_disparities(width: int) -> int:
    """Disparity search range in pixels of a `width`-pixel image (a multiple of 16, 64 at 320 pixels)."""
    return 16 * max(1, round(4 * width / REFERENCE_WIDTH))


def _sgbm(rig: StereoRig, width: int) -> cv2.StereoSGBM:
    bs = rig.block_size
    return cv2.StereoSGBM_create(
        minDisparity=0,
        numDisparities=UPSAMPLE * _num_disparities(width),
        blockSize=bs,
        P1=8 * bs * bs,
        P2=32 * bs * bs,
        disp12MaxDiff=-1,  # the full left-right check below replaces SGBM's internal approximation
        preFilterCap=31,
        uniquenessRatio=rig.uniqueness_ratio,
        speckleWindowSize=max(8, round(UPSAMPLE * 60 * (width / REFERENCE_WIDTH) ** 2)),
        speckleRange=2 * UPSAMPLE,
        mode=cv2.STEREO_SGBM_MODE_SGBM,
    )


def match_stereo(left: np.ndarray, right: np.ndarray, rig: StereoRig) -> np.ndarray:
    """Disparity (H, W) float32 pixels of the left view, 0 = rejected, from two rectified uint8 IR images.

    SGBM (with uniqueness and speckle filtering) on the pair and on the mirrored pair gives left and right
    disparities; a pixel survives if both agree within 1 pixel, its left-image texture passes the threshold, and
    it is not part of a small speckle left after the check.
    """
    height, width = left.shape
    matcher = _sgbm(rig, width)
    # SGBM leaves the first numDisparities columns unmatched whatever the depth; black margins let it match every
    # pixel that the other camera sees, so only the physical occlusion band stays invalid (as on real sensors).
    pad = UPSAMPLE * _num_disparities(width)

    def disparity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        wide = [cv2.resize(x, (UPSAMPLE * width, height), interpolation=cv2.INTER_CUBIC) for x in (a, b)]
        padded = [cv2.copyMakeBorder(x, 0, 0, pad, 0, cv2.BORDER_CONSTANT, value=0) for x in wide]
        disp = matcher.compute(*padded)[:, pad:]  # int16, 1/16 of an upsampled pixel, negative = invalid
        # Pixel j of the image spans columns UPSAMPLE * j ... UPSAMPLE * j + UPSAMPLE - 1 of the wide one.
        blocks = disp.reshape(height, width, UPSAMPLE).astype(np.float32) / (16 * UPSAMPLE)
        return np.where((blocks > 0).all(axis=2), blocks.mean(axis=2), 0)

    disp_left = disparity(left, right)
    disp_right = disparity(right[:, ::-1].copy(), left[:, ::-1].copy())[:, ::-1]
    valid = disp_left > 0
    cols = np.arange(width)[None, :] - np.rint(disp_left).astype(np.int64)
    inside = valid & (cols >= 0)
    rows = np.broadcast_to(np.arange(height)[:, None], cols.shape)
    partner = np.where(inside, disp_right[rows, np.clip(cols, 0, width - 1)], -1)
    consistent = inside & (partner > 0) & (np.abs(disp_left - partner) <= 1)

    # Texture check: the local contrast must stand out of the camera noise expected at that brightness (else SGM
    # only propagates disparities into the region from its edges).
    image = left.astype(np.float32)
    k = (rig.block_size, rig.block_size)
    mean = cv2.blur(image, k)
    variance = cv2.blur(image * image, k) - mean**2
    noise_variance = rig.read_noise**2 + rig.shot_noise**2 * mean
    textured = variance > rig.texture_snr**2 * noise_variance

    # filterSpeckles works on 16x fixed-point disparities: a speckle is a region differing by <= 1 pixel inside.
    fixed = np.where(consistent & textured, np.rint(disp_left * 16), 0).astype(np.int16)
    cv2.filterSpeckles(fixed, 0, max(8, round(60 * (width / REFERENCE_WIDTH) ** 2)), 16)
    return np.where(fixed > 0, disp_left, 0).astype(np.float32)


def disparity_to_depth(disparity: np.ndarray, fx: float, rig: StereoRig) -> np.ndarray:
    """Planar depth (H, W) float32 meters (0 = missing) from disparity in pixels: device range only, 1 mm steps."""
    with np.errstate(divide="ignore"):
        depth = np.where(disparity > 0, fx * rig.baseline / disparity, 0.0)
    depth = np.where(depth <= rig.max_range, depth, 0.0)
    return (np.rint(depth / DEPTH_RESOLUTION_M) * DEPTH_RESOLUTION_M).astype(np.float32)


def simulate_sensor(
    scene: Scene, left: Trace, camera: Camera, rig: StereoRig, sun: list[Light], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sensor depth (H, W) float32 meters (0 = missing) for the RGB camera, plus the left and right IR images."""
    ir_left, ir_right = render_ir_pair(scene, left, camera, rig, sun, rng)
    disparity = match_stereo(ir_left, ir_right, rig)
    return disparity_to_depth(disparity, camera.fx, rig), ir_left, ir_right
