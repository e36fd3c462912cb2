"""Procedural layouts for the synthetic generator: rooms and streets of planes, boxes, spheres and cylinders.

Each object draws a material class (textured matte, textureless, specular, transparent) and, for textured surfaces,
a periodic texture tile (noise, wood, tiles, bricks). Materials change how a surface looks in RGB *and* how the IR
speckle behaves on it, so sensor failures correlate with appearance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlm_depth.data.synthetic_scene import (
    MATERIAL_NAMES,
    SPECULAR,
    TEXTURE_SIZE,
    TEXTURED,
    TEXTURELESS,
    TRANSPARENT,
    Box,
    Camera,
    Cylinder,
    Light,
    Material,
    MipMap,
    Plane,
    Primitive,
    Scene,
    Sphere,
    look_rotation,
)
from vlm_depth.errors import ConfigError

SCENE_KINDS = ("room", "street", "mixed")


def _periodic_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Tileable (size, size) noise in [0, 1] with a 1/f^beta spectrum (white noise filtered in Fourier space)."""
    freq = np.fft.fftfreq(size)
    radius = np.hypot(*np.meshgrid(freq, freq))
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / np.maximum(radius, 1.0 / size) ** beta
    field = np.fft.ifft2(spectrum).real
    return (field - field.min()) / (field.max() - field.min())


def make_texture(rng: np.random.Generator, size: int = TEXTURE_SIZE) -> np.ndarray:
    """A periodic (size, size, 3) float32 albedo-multiplier tile: noise, wood grain, floor tiles or bricks."""
    kind = rng.choice(["noise", "wood", "tiles", "bricks"])
    yy, xx = np.mgrid[0:size, 0:size] / size
    noise = _periodic_noise(rng, size, rng.uniform(1.0, 2.0))
    if kind == "noise":
        value = noise
    elif kind == "wood":
        rings = int(rng.integers(3, 9))
        value = 0.5 + 0.5 * np.sin(2 * np.pi * (rings * yy + 0.8 * noise))
    else:
        n = int(rng.integers(2, 5))
        rows = np.floor(yy * n)
        shift = 0.5 * (rows % 2) if kind == "bricks" else 0.0
        cols_n = 2 * n if kind == "bricks" else n
        u, v = (xx * cols_n + shift) % 1.0, (yy * n) % 1.0
        grout = (np.minimum(u, 1 - u) < 0.04) | (np.minimum(v, 1 - v) < 0.06)
        cell = np.floor(xx * cols_n + shift) + 7 * rows
        cell_tone = 0.75 + 0.25 * np.sin(cell * 12.9898 + rng.uniform(0, 6.3)) ** 2
        value = np.where(grout, 0.25, cell_tone * (0.8 + 0.2 * noise))
    contrast = rng.uniform(0.35, 0.8)
    mono = 1.0 - contrast + contrast * value
    tint = 1.0 + rng.uniform(-0.25, 0.25, 3) * value[..., None]  # texture varies in hue as well as brightness
    return np.clip(mono[..., None] * tint, 0, 1.5).astype(np.float32)


def make_material(rng: np.random.Generator, code: int) -> Material:
    """Draw a material of class `code` (see the codes in `synthetic_scene`)."""
    color = rng.uniform(0.15, 0.9, 3)
    if code == TEXTURED:
        return Material(
            TEXTURED,
            color,
            texture=MipMap.build(make_texture(rng), wrap=True),
            texels_per_m=TEXTURE_SIZE / rng.uniform(0.25, 1.5),
            pattern_contrast=float(rng.uniform(0.7, 1.0)),
        )
    if code == TEXTURELESS:
        return Material(TEXTURELESS, color, pattern_contrast=float(rng.uniform(0.0, 0.25)))
    if code == SPECULAR:
        textured = rng.random() < 0.25
        return Material(
            SPECULAR,
            color * rng.uniform(0.3, 0.8),
            texture=MipMap.build(make_texture(rng), wrap=True) if textured else None,
            texels_per_m=TEXTURE_SIZE / rng.uniform(0.3, 1.5),
            pattern_contrast=float(rng.uniform(0.05, 0.3)),
            reflectance=float(rng.uniform(0.45, 0.9)),
            roughness=float(np.exp(rng.uniform(np.log(0.01), np.log(0.3)))),
            shininess=float(rng.uniform(60, 400)),
            highlight=float(rng.uniform(1.0, 3.0)),
        )
    if code == TRANSPARENT:
        return Material(
            TRANSPARENT,
            rng.uniform(0.85, 1.0, 3),
            pattern_contrast=0.0,
            shininess=float(rng.uniform(150, 500)),
            highlight=float(rng.uniform(1.0, 3.0)),
            ior=float(rng.uniform(1.4, 1.6)),
        )
    raise ConfigError(f"unknown material code {code}; choose one of {sorted(MATERIAL_NAMES)[1:]}")


def _pick(rng: np.random.Generator, weights: dict[int, float]) -> int:
    codes = list(weights)
    p = np.array([weights[c] for c in codes])
    return int(codes[rng.choice(len(codes), p=p / p.sum())])


def _yaw_rotation(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _plane(point, normal, u_axis, material: Material) -> Plane:
    n = np.asarray(normal, dtype=np.float64)
    u = np.asarray(u_axis, dtype=np.float64)
    return Plane(np.asarray(point, dtype=np.float64), np.stack([u, np.cross(n, u), n], axis=1), material)


def _glass(rng: np.random.Generator, material: Material, curved: bool) -> Material:
    """Glass transmits a projected speckle nearly intact through flat faces; curved solids smear it into caustics."""
    if material.code != TRANSPARENT:
        return material
    return dataclasses.replace(
        material, pattern_contrast=float(rng.uniform(0.0, 0.2) if curved else rng.uniform(0.6, 0.9))
    )


def _object(rng: np.random.Generator, base: np.ndarray, material: Material, scale: float = 1.0) -> Primitive:
    """A box, sphere or cylinder of random size and yaw resting on the height base[2] at (base[0], base[1])."""
    kind = rng.choice(["box", "sphere", "cylinder"], p=[0.45, 0.25, 0.3])
    material = _glass(rng, material, curved=kind != "box")
    rot = _yaw_rotation(rng.uniform(0, np.pi))
    if kind == "box":
        size = np.array([rng.uniform(0.1, 0.7), rng.uniform(0.1, 0.7), rng.uniform(0.1, 0.6)]) * scale
        return Box(base + [0, 0, size[2]], rot, size, material)
    if kind == "sphere":
        r = rng.uniform(0.1, 0.45) * scale
        return Sphere(base + [0, 0, r], r, material, rot)
    r, h = rng.uniform(0.05, 0.3) * scale, rng.uniform(0.1, 0.6) * scale
    return Cylinder(base + [0, 0, h], rot, r, h, material)


def _in_view(rng: np.random.Generator, cam_xy: np.ndarray, yaw: float, half_fov: float, near: float, far: float):
    angle = yaw + rng.uniform(-1.1, 1.1) * half_fov
    dist = rng.uniform(near, far)
    return cam_xy + dist * np.array([np.cos(angle), np.sin(angle)])


def _camera(rng: np.random.Generator, position, yaw, pitch, height: int, width: int) -> Camera:
    hfov = np.deg2rad(rng.uniform(55, 80))
    f = (width / 2) / np.tan(hfov / 2)
    cx = (width - 1) / 2 + rng.uniform(-0.015, 0.015) * width
    cy = (height - 1) / 2 + rng.uniform(-0.015, 0.015) * height
    rotation = look_rotation(yaw, pitch, rng.uniform(-0.05, 0.05))
    return Camera(np.asarray(position, dtype=np.float64), rotation, f, f, cx, cy, height, width)


OBJECT_MATERIALS = {TEXTURED: 0.35, TEXTURELESS: 0.25, SPECULAR: 0.22, TRANSPARENT: 0.18}


def make_room(rng: np.random.Generator, height: int, width: int) -> tuple[Scene, Camera, list[Light]]:
    """A closed room with furniture-like objects (some stacked on boxes) and a ceiling lamp.

    Returns the scene, the camera and the lights that also emit near infrared (none indoors).
    """
    size_x, size_y, size_z = rng.uniform(4, 9), rng.uniform(3, 7), rng.uniform(2.4, 3.4)
    wall = make_material(rng, _pick(rng, {TEXTURED: 0.55, TEXTURELESS: 0.45}))
    prims: list[Primitive] = [
        _plane([0, 0, 0], [0, 0, 1], [1, 0, 0], make_material(rng, _pick(rng, {TEXTURED: 0.85, SPECULAR: 0.15}))),
        _plane(
            [0, 0, size_z], [0, 0, -1], [1, 0, 0], make_material(rng, _pick(rng, {TEXTURED: 0.3, TEXTURELESS: 0.7}))
        ),
        _plane([0, 0, 0], [1, 0, 0], [0, 1, 0], wall),
        _plane([size_x, 0, 0], [-1, 0, 0], [0, 1, 0], wall if rng.random() < 0.5 else make_material(rng, TEXTURED)),
        _plane([0, -size_y / 2, 0], [0, 1, 0], [1, 0, 0], wall),
        _plane([0, size_y / 2, 0], [0, -1, 0], [1, 0, 0], wall),
    ]
    cam_pos = np.array([rng.uniform(0.3, 1.2), rng.uniform(-0.3, 0.3) * size_y, rng.uniform(1.0, 1.8)])
    yaw, pitch = rng.uniform(-0.5, 0.5), rng.uniform(-0.35, 0.05)
    camera = _camera(rng, cam_pos, yaw, pitch, height, width)
    half_fov = np.arctan(width / 2 / camera.fx)
    tables: list[Box] = []
    for _ in range(int(rng.integers(4, 10))):
        material = make_material(rng, _pick(rng, OBJECT_MATERIALS))
        if tables and rng.random() < 0.3:
            table = tables[int(rng.integers(len(tables)))]
            offset = table.rotation[:2, :2] @ (rng.uniform(-0.6, 0.6, 2) * table.size[:2])
            base = np.array([*(table.center[:2] + offset), table.center[2] + table.size[2]])
            prims.append(_object(rng, base, material, scale=0.5))
            continue
        xy = _in_view(rng, cam_pos[:2], yaw, half_fov, 1.0, 5.0)
        xy = np.clip(xy, [0.6, -size_y / 2 + 0.6], [size_x - 0.6, size_y / 2 - 0.6])
        obj = _object(rng, np.array([*xy, 0.0]), material)
        prims.append(obj)
        if isinstance(obj, Box) and material.code != TRANSPARENT:
            tables.append(obj)
    lamp = Light(
        color=rng.uniform(2.0, 5.0) * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.65, 0.95)]),
        position=np.array([rng.uniform(0.5, size_x - 0.5), rng.uniform(-0.4, 0.4) * size_y, size_z - 0.15]),
    )
    scene = Scene(prims, [lamp], ambient=np.full(3, rng.uniform(0.12, 0.3)), kind="room")
    return scene, camera, []


def make_street(rng: np.random.Generator, height: int, width: int) -> tuple[Scene, Camera, list[Light]]:
    """A street closed by a building 12-30 m ahead: road, sidewalks, facades on both sides, cars, poles, trees and
    glass, lit by the sun.

    Returns the scene, the camera and the lights that also emit near infrared (the sun).
    """
    half_street, end_x = rng.uniform(3, 7), rng.uniform(12, 30)
    prims: list[Primitive] = [
        _plane([0, 0, 0], [0, 0, 1], [1, 0, 0], make_material(rng, TEXTURED)),
        _plane(
            [end_x, 0, 0], [-1, 0, 0], [0, 1, 0], make_material(rng, _pick(rng, {TEXTURED: 0.7, TEXTURELESS: 0.3}))
        ),
    ]
    for side in (-1, 1):
        curb = make_material(rng, _pick(rng, {TEXTURED: 0.7, TEXTURELESS: 0.3}))
        sidewalk = np.array([end_x / 2 + 5, 1.0, 0.075])
        prims.append(Box(np.array([end_x / 2, side * (half_street + 1.0), 0.075]), np.eye(3), sidewalk, curb))
        x = rng.uniform(-5, 2)
        while x < end_x:
            length = rng.uniform(6, 20)
            facade = make_material(rng, _pick(rng, {TEXTURED: 0.6, TEXTURELESS: 0.25, SPECULAR: 0.15}))
            size = np.array([length / 2, 5.0, rng.uniform(3, 12)])
            setback = half_street + 2 + rng.uniform(0, 1.5)
            prims.append(Box(np.array([x + length / 2, side * (setback + 5), size[2]]), np.eye(3), size, facade))
            x += length + rng.uniform(0, 3)
    for _ in range(int(rng.integers(2, 6))):
        paint = make_material(rng, _pick(rng, {SPECULAR: 0.6, TEXTURELESS: 0.25, TEXTURED: 0.15}))
        center = np.array([rng.uniform(4, end_x - 3), rng.uniform(-half_street + 1, half_street - 1), 0.0])
        rot = _yaw_rotation(rng.normal(0, 0.15))
        body = np.array([2.1, 0.9, 0.45])
        prims.append(Box(center + [0, 0, 0.3 + body[2]], rot, body, paint))
        cabin = _glass(rng, make_material(rng, _pick(rng, {TRANSPARENT: 0.5, SPECULAR: 0.5})), curved=False)
        prims.append(Box(center + rot @ [-0.2, 0, 0] + [0, 0, 1.2 + 0.3], rot, np.array([1.1, 0.8, 0.3]), cabin))
    for _ in range(int(rng.integers(2, 8))):
        side = rng.choice([-1, 1])
        base = np.array([rng.uniform(3, end_x - 2), side * (half_street + rng.uniform(0.3, 1.8)), 0.0])
        if rng.random() < 0.5:
            pole = make_material(rng, _pick(rng, {SPECULAR: 0.5, TEXTURELESS: 0.3, TEXTURED: 0.2}))
            h = rng.uniform(1.5, 3.5)
            prims.append(Cylinder(base + [0, 0, h], np.eye(3), rng.uniform(0.05, 0.15), h, pole))
        else:
            trunk_h, trunk_r = rng.uniform(0.8, 1.8), rng.uniform(0.1, 0.2)
            prims.append(Cylinder(base + [0, 0, trunk_h], np.eye(3), trunk_r, trunk_h, make_material(rng, TEXTURED)))
            r = rng.uniform(1.0, 2.2)
            prims.append(Sphere(base + [0, 0, 2 * trunk_h + 0.8 * r], r, make_material(rng, TEXTURED)))
    for _ in range(int(rng.integers(0, 3))):
        base = np.array([rng.uniform(3, 12), rng.uniform(-half_street, half_street) * 0.8, 0.0])
        prims.append(_object(rng, base, make_material(rng, _pick(rng, OBJECT_MATERIALS)), scale=1.5))
    cam_pos = np.array([0.0, rng.uniform(-half_street + 1, half_street - 1), rng.uniform(1.2, 2.0)])
    camera = _camera(rng, cam_pos, rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.02), height, width)
    elevation, azimuth = rng.uniform(0.35, 1.2), rng.uniform(0, 2 * np.pi)
    sun = Light(
        color=rng.uniform(2.0, 3.5) * np.array([1.0, 0.95, 0.85]),
        direction=np.array(
            [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)]
        ),
    )
    sky = np.array([0.45, 0.62, 0.95]) * rng.uniform(0.9, 1.3)
    scene = Scene(
        prims, [sun], ambient=np.array([0.25, 0.3, 0.4]) * rng.uniform(0.8, 1.3), sky_color=sky, kind="street"
    )
    return scene, camera, [sun]


def make_scene(rng: np.random.Generator, kind: str, height: int, width: int) -> tuple[Scene, Camera, list[Light]]:
    """A random scene of `kind` (room, street, or mixed: a room 4/5 of the time), its camera and IR-emitting lights."""
    if kind == "mixed":
        kind = "room" if rng.random() < 0.8 else "street"
    if kind == "room":
        return make_room(rng, height, width)
    if kind == "street":
        return make_street(rng, height, width)
    raise ConfigError(f"unknown synthetic scene kind {kind!r}; choose one of {SCENE_KINDS}")
