"""Procedural scenes and vectorised ray casting for the synthetic RGB-D generator.

World frame: meters, z up, the floor / road at z = 0. Cameras follow OpenCV (x right, y down, z forward); a pixel
(i, j) has its centre at (x, y) = (j, i) and its ray direction is ((j - cx) / fx, (i - cy) / fy, 1) rotated into the
world, so the ray parameter of a hit *is* the planar depth. Geometry is NumPy float64 throughout.

Light transport is one bounce deep: a pixel sees its first surface (diffuse + highlight), plus a mirror reflection
on specular surfaces, plus a Fresnel reflection and a refracted view through solid glass (entry and exit refraction)
on transparent ones. The same traced paths are shaded twice: in visible light for the RGB image and in near infrared
(projector pattern, see `synthetic_sensor`) for the stereo pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

# Material codes of the per-pixel `material` label map (uint8).
SKY = 0  # no surface: background / sky, no ground truth
TEXTURED = 1  # textured matte (the sensor's good case)
TEXTURELESS = 2  # uniform matte paint that washes out the projected speckle
SPECULAR = 3  # glossy / metallic: mirror reflection and highlights
TRANSPARENT = 4  # solid glass: refraction and Fresnel reflection
MATERIAL_NAMES = {
    SKY: "sky",
    TEXTURED: "textured",
    TEXTURELESS: "textureless",
    SPECULAR: "specular",
    TRANSPARENT: "transparent",
}

TEXTURE_SIZE = 64
_EPS = 1e-4  # m: offset of secondary-ray origins off a surface, far below the thinnest object (1 cm)


@dataclass(frozen=True, eq=False)
class MipMap:
    """An image and its successive 2x box-filtered halvings, sampled with the level that matches a pixel's footprint.

    Sampling a texture (or the projected speckle) at a point with no prefilter aliases: the two stereo cameras
    would see unrelated noise. Level k averages 2^k x 2^k texels, so a pixel covering n texels reads level log2(n).
    levels: float32 (h / 2^k, w / 2^k, C). wrap: the image is a periodic tile; otherwise it is 0 outside.
    """

    levels: tuple[np.ndarray, ...] = field(repr=False)
    wrap: bool

    @classmethod
    def build(cls, image: np.ndarray, wrap: bool) -> MipMap:
        """Pyramid of a float32 (h, w) or (h, w, C) image down to one texel along its shorter side."""
        image = image.astype(np.float32)
        levels = [image[..., None] if image.ndim == 2 else image]
        while min(levels[-1].shape[:2]) >= 2:
            h, w = levels[-1].shape[:2]
            half = cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            levels.append(half.reshape(h // 2, w // 2, -1))
        return cls(tuple(levels), wrap)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.levels[0].shape

    def sample(self, xy: np.ndarray, texels_per_pixel: np.ndarray) -> np.ndarray:
        """Trilinear samples (M, C) at level-0 texel coordinates xy (M, 2) (x = column) for pixel footprints (M,)."""
        level = np.clip(np.log2(np.maximum(texels_per_pixel, 1.0)), 0, len(self.levels) - 1)
        low = np.floor(level).astype(np.int64)
        frac = (level - low)[:, None]
        out = np.zeros((len(xy), self.levels[0].shape[2]), dtype=np.float32)
        for k in np.unique(low):
            sel = low == k
            a = self._bilinear(k, xy[sel])
            b = self._bilinear(min(k + 1, len(self.levels) - 1), xy[sel])
            out[sel] = a + frac[sel] * (b - a)
        return out

    def _bilinear(self, k: int, xy: np.ndarray) -> np.ndarray:
        image = self.levels[k]
        h, w = image.shape[:2]
        # Texel centres of level k sit at (2^k - 1) / 2 in level-0 texels.
        xy = (xy + 0.5) / 2**k - 0.5
        if self.wrap:
            xy = np.stack([np.mod(xy[:, 0], w), np.mod(xy[:, 1], h)], axis=1)
        else:
            xy = np.where(np.isfinite(xy), np.clip(xy, -2, max(h, w) + 2), -2)
        n, cols = len(xy), 256  # cv2.remap needs 2-D maps shorter than 32767 on each side
        maps = np.zeros((2, -(-n // cols) * cols), dtype=np.float32)
        maps[:, :n] = xy.T
        mx, my = maps.reshape(2, -1, cols)
        border = cv2.BORDER_WRAP if self.wrap else cv2.BORDER_CONSTANT
        out = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=border, borderValue=0)
        return out.reshape(-1, image.shape[2])[:n]


@dataclass(frozen=True)
class Material:
    """Surface appearance. albedo: linear RGB in [0, 1]; texture: periodic multiplier tile (T, T, 3) or None.

    pattern_contrast: fraction of the projected speckle contrast that survives on this surface (subsurface
    scattering and dark paints wash it out), or for glass, through it (curved solids smear it into caustics).
    reflectance: mirror weight (specular) or 0; roughness: angular blur (radians) of that reflection.
    shininess: Blinn-Phong exponent of the highlight; highlight: its weight. ior: refractive index of glass.
    """

    code: int
    albedo: np.ndarray
    texture: MipMap | None = None
    texels_per_m: float = 64.0
    pattern_contrast: float = 1.0
    reflectance: float = 0.0
    roughness: float = 0.0
    shininess: float = 10.0
    highlight: float = 0.02
    ior: float = 1.5


def _local(o: np.ndarray, d: np.ndarray, center: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (o - center) @ rotation, d @ rotation


@dataclass(frozen=True)
class Plane:
    """One-sided infinite plane through `center` facing `rotation[:, 2]`; the half-space behind it is solid.

    rotation: (3, 3) columns = in-plane texture axes u, v and the normal.
    """

    center: np.ndarray
    rotation: np.ndarray
    material: Material

    bound = np.inf

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.rotation[:, 2]
        denom = d @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((self.center - o) @ n) / denom
        t_in = np.where(denom < 0, t, np.inf)
        return t_in, np.full_like(t_in, np.inf)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (p - self.center) @ self.rotation
        return np.broadcast_to(self.rotation[:, 2], p.shape).copy(), local[:, :2]


@dataclass(frozen=True)
class Box:
    """Oriented box: half-extents `size` along the columns of `rotation`, centred at `center`."""

    center: np.ndarray
    rotation: np.ndarray
    size: np.ndarray
    material: Material

    @property
    def bound(self) -> float:
        """Radius (m) of a sphere around `center` that contains the primitive."""
        return float(np.linalg.norm(self.size))

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ol, dl = _local(o, d, self.center, self.rotation)
        t_in, t_out = -np.inf, np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in range(3):  # slab method, one axis at a time (1-D arrays are much faster than axis reductions)
                t1, t2 = (-self.size[k] - ol[:, k]) / dl[:, k], (self.size[k] - ol[:, k]) / dl[:, k]
                t_in = np.maximum(t_in, np.minimum(t1, t2))
                t_out = np.minimum(t_out, np.maximum(t1, t2))
        miss = ~(t_in <= t_out)
        return np.where(miss, np.inf, t_in), np.where(miss, np.inf, t_out)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (p - self.center) @ self.rotation
        scaled = np.abs(local) / self.size
        axis = scaled.argmax(axis=1)
        rows = np.arange(len(p))
        normal_local = np.zeros_like(local)
        normal_local[rows, axis] = np.sign(local[rows, axis])
        # Texture coordinates: the two in-face axes, shifted per face so opposite faces do not repeat.
        u_axis, v_axis = (axis + 1) % 3, (axis + 2) % 3
        uv = np.stack([local[rows, u_axis], local[rows, v_axis]], axis=1) + axis[:, None] * 0.37
        return normal_local @ self.rotation.T, uv


@dataclass(frozen=True)
class Sphere:
    """Sphere of radius `radius` at `center`; `rotation` orients its texture."""

    center: np.ndarray
    radius: float
    material: Material
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def bound(self) -> float:
        """Radius (m) of a sphere around `center` that contains the primitive."""
        return float(self.radius)

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        oc = o - self.center
        a = np.einsum("ij,ij->i", d, d)
        b = np.einsum("ij,ij->i", np.broadcast_to(oc, d.shape), d)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        return _quadratic_interval(a, b, np.broadcast_to(c, a.shape))

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        normal = (p - self.center) / self.radius
        local = normal @ self.rotation
        u = np.arctan2(local[:, 1], local[:, 0]) * self.radius
        v = np.arccos(np.clip(local[:, 2], -1, 1)) * self.radius
        return normal, np.stack([u, v], axis=1)


@dataclass(frozen=True)
class Cylinder:
    """Capped cylinder: axis `rotation[:, 2]` through `center`, radius `radius`, half-height `half_height`."""

    center: np.ndarray
    rotation: np.ndarray
    radius: float
    half_height: float
    material: Material

    @property
    def bound(self) -> float:
        """Radius (m) of a sphere around `center` that contains the primitive."""
        return float(np.hypot(self.radius, self.half_height))

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ol, dl = _local(o, d, self.center, self.rotation)
        ol = np.broadcast_to(ol, dl.shape)
        a = dl[:, 0] ** 2 + dl[:, 1] ** 2
        b = ol[:, 0] * dl[:, 0] + ol[:, 1] * dl[:, 1]
        c = ol[:, 0] ** 2 + ol[:, 1] ** 2 - self.radius**2
        side_in, side_out = _quadratic_interval(a, b, c)
        # A ray parallel to the axis is inside the infinite cylinder for all t, or never.
        parallel = a < 1e-18
        side_in = np.where(parallel, np.where(c < 0, -np.inf, np.inf), side_in)
        side_out = np.where(parallel, np.inf, side_out)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-self.half_height - ol[:, 2]) / dl[:, 2], (self.half_height - ol[:, 2]) / dl[:, 2]
        t_in = np.maximum(side_in, np.minimum(t1, t2))
        t_out = np.minimum(side_out, np.maximum(t1, t2))
        miss = ~(t_in <= t_out)
        return np.where(miss, np.inf, t_in), np.where(miss, np.inf, t_out)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (p - self.center) @ self.rotation
        rho = np.hypot(local[:, 0], local[:, 1])
        on_cap = np.abs(self.half_height - np.abs(local[:, 2])) < np.abs(self.radius - rho)
        normal_local = np.where(
            on_cap[:, None],
            np.stack([np.zeros_like(rho), np.zeros_like(rho), np.sign(local[:, 2])], axis=1),
            np.stack([local[:, 0], local[:, 1], np.zeros_like(rho)], axis=1) / np.maximum(rho, 1e-12)[:, None],
        )
        side_uv = np.stack([np.arctan2(local[:, 1], local[:, 0]) * self.radius, local[:, 2]], axis=1)
        uv = np.where(on_cap[:, None], local[:, :2], side_uv)
        return normal_local @ self.rotation.T, uv


Primitive = Plane | Box | Sphere | Cylinder


def _quadratic_interval(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of a t^2 + 2 b t + c = 0 as (t_in, t_out), inf where there are none (cancellation-free form)."""
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0))
    q = -(b + np.copysign(root, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = q / a, c / q
    miss = (disc < 0) | (a <= 0)
    return np.where(miss, np.inf, np.minimum(t1, t2)), np.where(miss, np.inf, np.maximum(t1, t2))


@dataclass(frozen=True, eq=False)
class Light:
    """A point light (`position`) or a directional one (`direction`, unit, pointing towards the light).

    color: (3,) intensity (point lights: at 1 m). pattern: optional multiplier of the irradiance in [0, 1] (the IR
    speckle projector), a function of world points (M, 3) and camera-pixel footprints there (M,) meters, averaged
    over the footprint; `pattern_mean` is its average.
    """

    color: np.ndarray
    position: np.ndarray | None = None
    direction: np.ndarray | None = None
    pattern: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    pattern_mean: float = 1.0


@dataclass
class Scene:
    """Primitives plus the lighting of the visible image; `sky(dirs)` gives the RGB radiance of rays that miss."""

    primitives: list[Primitive]
    lights: list[Light] = field(default_factory=list)
    ambient: np.ndarray = field(default_factory=lambda: np.full(3, 0.2))
    sky_color: np.ndarray = field(default_factory=lambda: np.array([0.55, 0.7, 0.95]))
    kind: str = "custom"

    def __post_init__(self) -> None:
        self.codes = np.array([p.material.code for p in self.primitives] + [SKY], dtype=np.uint8)
        self.opaque = self.codes[:-1] != TRANSPARENT

    def sky(self, dirs: np.ndarray) -> np.ndarray:
        """RGB radiance (M, 3) of rays (M, 3) leaving the scene: brighter towards the horizon."""
        up = dirs[:, 2] / np.maximum(_norm(dirs), 1e-12)
        return self.sky_color[None, :] * (1.0 - 0.35 * np.clip(up, 0, 1))[:, None]


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: world position (3,), rotation (3, 3) camera-to-world (columns: right, down, forward)."""

    position: np.ndarray
    rotation: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    @property
    def intrinsics(self) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels."""
        return (self.fx, self.fy, self.cx, self.cy)

    def rays(self) -> np.ndarray:
        """World ray directions (H*W, 3), row-major, scaled so that the ray parameter is planar depth (m)."""
        x = (np.arange(self.width) - self.cx) / self.fx
        y = (np.arange(self.height) - self.cy) / self.fy
        r = self.rotation
        dirs = x[None, :, None] * r[:, 0] + y[:, None, None] * r[:, 1] + r[:, 2]
        return dirs.reshape(-1, 3)

    def shifted(self, right_m: float) -> Camera:
        """The same camera moved `right_m` meters along its own x axis (a rectified stereo partner)."""
        return Camera(
            self.position + right_m * self.rotation[:, 0], self.rotation, *self.intrinsics, self.height, self.width
        )

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points (M, 3) -> pixel x, y and planar depth z (each (M,))."""
        cam = (points - self.position) @ self.rotation
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.fx * cam[:, 0] / cam[:, 2] + self.cx, self.fy * cam[:, 1] / cam[:, 2] + self.cy, cam[:, 2]


def look_rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation (columns right, down, forward) for a camera looking along yaw/pitch (radians)."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    return np.stack([c * right + s * down, -s * right + c * down, forward], axis=1)


class _Culler:
    """Bounding-sphere culling for a bundle of rays with a shared structure, one dot product per ray and primitive.

    Rays whose lines all pass through one point (`through`: a camera centre, or the point light that shadow rays
    aim at) can only hit a primitive if they point into the cone its bounding sphere subtends from there;
    `parallel` rays (a distant light) must pass within the bound of its centre.
    """

    def __init__(self, o: np.ndarray, d: np.ndarray, through: np.ndarray | None, parallel: bool) -> None:
        self.mode = "parallel" if parallel else ("cone" if through is not None else None)
        if self.mode == "parallel":
            self.u = d[0] / np.linalg.norm(d[0])
            basis = np.linalg.svd(self.u[None, :])[2][1:]  # two unit vectors orthogonal to u
            self.basis, self.o2, self.along = basis, o @ basis.T, o @ self.u
        elif self.mode == "cone":
            self.through = through
            axis = d if o.shape[0] == 1 else o - through  # from the apex along each ray's line
            self.axis = _unit(axis)

    def candidates(self, prim: Primitive) -> np.ndarray | None:
        """Indices of the rays that may hit `prim`, or None for all of them."""
        radius = prim.bound
        if self.mode is None or not np.isfinite(radius):
            return None
        if self.mode == "parallel":
            offset = self.o2 - prim.center @ self.basis.T
            close = np.einsum("ij,ij->i", offset, offset) <= radius**2
            return np.flatnonzero(close & (prim.center @ self.u - self.along >= -radius))
        v = prim.center - self.through
        dist = float(np.linalg.norm(v))
        if dist <= radius:
            return None
        return np.flatnonzero(self.axis @ v >= np.sqrt(dist**2 - radius**2))


def cast(
    scene: Scene,
    o: np.ndarray,
    d: np.ndarray,
    which: np.ndarray | None = None,
    through: np.ndarray | None = None,
    parallel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """First hit of rays o + t d (o: (N, 3) or (3,), d: (N, 3)) with t > 0 among `scene.primitives[which]`.

    which: boolean mask over primitives (default all). through: a point every ray's line passes through (the
    common origin of camera rays, or the light that shadow rays aim at); parallel: all directions are equal. Both
    only speed up culling. Returns t (N,) (inf = miss) and the primitive index (N,) (-1 = miss).
    """
    o = np.atleast_2d(o)
    if o.shape[0] == 1 and through is None:
        through = o[0]
    culler = _Culler(o, d, through, parallel)
    best_t = np.full(len(d), np.inf)
    best_k = np.full(len(d), -1, dtype=np.int64)
    for k, prim in enumerate(scene.primitives):
        if which is not None and not which[k]:
            continue
        rays = culler.candidates(prim)
        if rays is None:
            t_in, t_out = prim.intersect(o, d)
            rays = slice(None)
        elif len(rays) == 0:
            continue
        else:
            t_in, t_out = prim.intersect(o if o.shape[0] == 1 else o[rays], d[rays])
        t = np.where(t_in > 0, t_in, np.where(t_out > 0, t_out, np.inf))
        closer = t < best_t[rays]
        best_t[rays] = np.where(closer, t, best_t[rays])
        best_k[rays] = np.where(closer, k, best_k[rays])
    return best_t, best_k


def surface_at(scene: Scene, points: np.ndarray, prim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward unit normals (M, 3) and texture coordinates in meters (M, 2) at points lying on primitives `prim`."""
    normal = np.zeros_like(points)
    uv = np.zeros((len(points), 2))
    for k in np.unique(prim[prim >= 0]):
        sel = prim == k
        normal[sel], uv[sel] = scene.primitives[k].surface(points[sel])
    return normal, uv


@dataclass
class Segment:
    """Surface points (or sky directions) whose radiance, times `weight`, adds to image pixels `pixel`.

    view: (M, 3) unit directions of the arriving rays; length: (M,) meters travelled since the previous vertex;
    prim: (M,) primitive index, -1 = the ray left the scene; footprint: (M,) meters covered by the pixel there.
    """

    pixel: np.ndarray
    weight: np.ndarray
    points: np.ndarray
    prim: np.ndarray
    normal: np.ndarray
    uv: np.ndarray
    view: np.ndarray
    length: np.ndarray
    footprint: np.ndarray | None = None
    albedo: np.ndarray | None = None  # (M, 3), filled on first use
    visibility: dict[Light, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class Trace:
    """All light paths of one camera: the planar depth and material of the first surface, and shading segments."""

    depth: np.ndarray  # (H, W) float32 planar depth (m) of the first surface, 0 = sky
    material: np.ndarray  # (H, W) uint8 material code of the first surface
    segments: list[Segment]


def _norm(v: np.ndarray) -> np.ndarray:
    """Row norms of (M, 3) vectors (einsum: several times faster than np.linalg.norm on short rows)."""
    return np.sqrt(np.einsum("ij,ij->i", v, v))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(_norm(v), 1e-12)[:, None]


def _segment(scene: Scene, pixel, weight, o, d, which) -> Segment:
    """Cast rays o + t d (d unit) against `which` primitives and describe what they hit."""
    t, prim = cast(scene, o, d, which)
    hit = prim >= 0
    length = np.where(hit, t, 0)
    points = np.where(hit[:, None], o + length[:, None] * d, 0)
    normal, uv = surface_at(scene, points, prim)
    return Segment(pixel, weight, points, prim, normal, uv, d, length)


def _reflect(d: np.ndarray, n: np.ndarray) -> np.ndarray:
    return d - 2 * np.einsum("ij,ij->i", d, n)[:, None] * n


def _refract(d: np.ndarray, n: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Snell refraction of unit rays d at unit normals n facing against d, index ratio eta = n1 / n2.

    Total internal reflection returns the mirror direction.
    """
    cos_i = -np.einsum("ij,ij->i", d, n)
    k = 1 - eta**2 * (1 - cos_i**2)
    out = eta[:, None] * d + (eta * cos_i - np.sqrt(np.maximum(k, 0)))[:, None] * n
    return np.where((k < 0)[:, None], _reflect(d, n), _unit(out))


def trace(scene: Scene, camera: Camera) -> Trace:
    """Trace every pixel of `camera` one bounce deep (see the module docstring)."""
    d = camera.rays()
    n_pix = len(d)
    t, prim = cast(scene, camera.position, d)
    hit = prim >= 0
    points = camera.position + np.where(hit, t, 0)[:, None] * d
    normal, uv = surface_at(scene, points, prim)
    material = scene.codes[prim]
    view = _unit(d)
    pixels = np.arange(n_pix)
    length = np.where(hit, t * _norm(d), 0)
    primary = Segment(pixels, np.ones(n_pix), points, prim, normal, uv, view, length)
    shape = (camera.height, camera.width)
    primary.footprint = _footprint(primary, shape, np.where(hit, t, 0) / camera.fx)
    segments = [primary]

    per_prim = np.array([[p.material.reflectance, p.material.roughness] for p in scene.primitives] + [[0, 0]])
    reflectance, roughness = per_prim[prim].T
    mirror = np.flatnonzero((material == SPECULAR) & (reflectance > 0))
    if len(mirror):
        r = _reflect(view[mirror], normal[mirror])
        o = points[mirror] + _EPS * normal[mirror]
        segments.append(_segment(scene, mirror, reflectance[mirror], o, r, scene.opaque))

    glass = np.flatnonzero(material == TRANSPARENT)
    if len(glass):
        segments += _glass_segments(scene, glass, points[glass], normal[glass], view[glass], prim[glass])
    for seg in segments[1:]:
        seg.footprint = _footprint(seg, shape, primary.footprint[seg.pixel])
        # A rough reflection blurs what it shows by its cone angle times the distance travelled.
        seg.footprint = np.hypot(seg.footprint, roughness[seg.pixel] * seg.length)
    return Trace(np.where(hit, t, 0).astype(np.float32).reshape(shape), material.reshape(shape), segments)


def _footprint(seg: Segment, shape: tuple[int, int], fallback: np.ndarray) -> np.ndarray:
    """Meters per pixel at a segment's points: the spacing of the points of neighbouring pixels on the same primitive.

    Finite differences over the image grid are ray differentials for free: they grow at grazing angles, behind
    minifying glass and in convex mirrors. Per axis the smaller one-sided difference is used (the other may cross an
    edge); pixels with no neighbour on their primitive take `fallback` (M,).
    """
    h, w = shape
    points = np.full((h * w, 3), np.nan)
    prim = np.full(h * w, -2)
    points[seg.pixel], prim[seg.pixel] = seg.points, np.where(seg.prim >= 0, seg.prim, -2)
    points, prim = points.reshape(h, w, 3), prim.reshape(h, w)

    def one_axis(axis: int) -> np.ndarray:
        a, b = (slice(None), slice(None)), (slice(None), slice(None))
        a = tuple(slice(1, None) if i == axis else s for i, s in enumerate(a))
        b = tuple(slice(None, -1) if i == axis else s for i, s in enumerate(b))
        step = np.linalg.norm(points[a] - points[b], axis=-1)
        step = np.where((prim[a] == prim[b]) & (prim[a] >= 0), step, np.nan)
        pad_before = [(1, 0) if i == axis else (0, 0) for i in range(2)]
        pad_after = [(0, 1) if i == axis else (0, 0) for i in range(2)]
        before = np.pad(step, pad_before, constant_values=np.nan)
        after = np.pad(step, pad_after, constant_values=np.nan)
        return np.fmin(before, after)

    with np.errstate(invalid="ignore"):
        along_y, along_x = one_axis(0), one_axis(1)
        # Geometric mean of the two axes: a grazing surface keeps its detail across the foreshortened direction
        # (isotropic filtering with the larger axis would blur everything), and one axis stands in for a missing one.
        step = np.sqrt(np.fmax(along_y, along_x) * np.fmin(along_y, along_x)).reshape(-1)[seg.pixel]
    return np.where(np.isfinite(step), step, fallback)


def _glass_segments(scene: Scene, pixel, p, n, v, prim) -> list[Segment]:
    """Fresnel reflection and the refracted view through a solid glass primitive (in, across, out)."""
    ior = np.array([scene.primitives[k].material.ior for k in prim])
    cos_i = np.clip(-np.einsum("ij,ij->i", v, n), 0, 1)
    f0 = ((ior - 1) / (ior + 1)) ** 2
    fresnel = f0 + (1 - f0) * (1 - cos_i) ** 5  # Schlick
    reflected = _segment(scene, pixel, fresnel, p + _EPS * n, _reflect(v, n), scene.opaque)

    inside = _refract(v, n, 1.0 / ior)
    o_in = p - _EPS * n
    t_exit = np.full(len(pixel), np.inf)
    for k in np.unique(prim):
        sel = prim == k
        _, t_out = scene.primitives[k].intersect(o_in[sel], inside[sel])
        t_exit[sel] = t_out
    t_exit = np.where(np.isfinite(t_exit), t_exit, 0)
    p_exit = o_in + t_exit[:, None] * inside
    n_exit, _ = surface_at(scene, p_exit, prim)
    out = _refract(inside, -n_exit, ior)
    # A totally internally reflected ray bounces on inside and leaves somewhere unrelated: what it would show is
    # scrambled, so it contributes nothing here (the pixel keeps its Fresnel reflection).
    leaving = np.einsum("ij,ij->i", out, n_exit) > 0
    transmission = (1 - fresnel) * 0.92 * leaving
    refracted = _segment(scene, pixel, transmission, p_exit + _EPS * n_exit, out, scene.opaque)
    return [reflected, refracted]


# Textures are applied at two scales (the tile, and the tile transposed and MACRO_SCALE times larger) so that
# surfaces keep some texture when seen from afar, and the tiling does not repeat visibly.
MACRO_SCALE = 7.3


def albedo_at(scene: Scene, seg: Segment) -> np.ndarray:
    """Linear RGB albedo (M, 3) at the segment's points (material colour times its texture); 0 on sky."""
    out = np.zeros((len(seg.prim), 3))
    for k in np.unique(seg.prim[seg.prim >= 0]):
        sel = seg.prim == k
        mat = scene.primitives[k].material
        out[sel] = mat.albedo
        if mat.texture is not None:
            xy, texels = seg.uv[sel] * mat.texels_per_m, seg.footprint[sel] * mat.texels_per_m
            detail = mat.texture.sample(xy, texels)
            macro = mat.texture.sample(xy[:, ::-1] / MACRO_SCALE + 17.0, texels / MACRO_SCALE)
            out[sel] *= detail * macro
    return out


def light_visibility(scene: Scene, seg: Segment, light: Light) -> tuple[np.ndarray, np.ndarray]:
    """How a light reaches the segment's points (cached per light): visibility (M,), 1 unless an opaque primitive is
    in the way, and for patterned lights the fraction (M,) of the pattern contrast that survives on the way.

    Glass does not block light, but a curved solid smears a projected speckle into caustics: the pattern factor is
    the `pattern_contrast` of the first transparent primitive crossed (1 if none).
    """
    if light not in seg.visibility:
        hit = seg.prim >= 0
        vis, through = np.zeros(len(hit)), np.ones(len(hit))
        if hit.any():
            p = seg.points[hit] + _EPS * seg.normal[hit]
            if light.position is not None:
                to_light = light.position - p
                dist = _norm(to_light)
                dirs, kw = to_light / dist[:, None], {"through": light.position}
            else:
                dist, dirs, kw = np.inf, np.broadcast_to(light.direction, p.shape), {"parallel": True}
            t, _ = cast(scene, p, dirs, scene.opaque, **kw)
            vis[hit] = t >= dist
            if light.pattern is not None and not scene.opaque.all():
                t, k = cast(scene, p, dirs, ~scene.opaque, **kw)
                contrast = np.array([q.material.pattern_contrast for q in scene.primitives] + [1.0])
                through[hit] = np.where(t < dist, contrast[k], 1.0)
        seg.visibility[light] = (vis, through)
    return seg.visibility[light]


def radiance(
    scene: Scene, seg: Segment, lights: list[Light], ambient: np.ndarray, sky: np.ndarray, grey: bool = False
) -> np.ndarray:
    """Outgoing radiance (M, 3) towards the viewer: Lambert + Blinn-Phong highlight for each light, with shadows.

    grey: use the albedo's luminance in all channels (near-infrared). ambient: (3,) irradiance; sky: (M, 3)
    radiance of rays that left the scene. Transparent surfaces only contribute their highlight here (their
    reflected and refracted light comes from their own segments).
    """
    hit = seg.prim >= 0
    mats = [p.material for p in scene.primitives]
    per_prim = np.array(
        [[m.code, m.pattern_contrast, m.reflectance, m.shininess, m.highlight] for m in mats] + [[0] * 5]
    )
    code, contrast, reflectance, shininess, highlight = per_prim[seg.prim].T
    if seg.albedo is None:
        seg.albedo = albedo_at(scene, seg)
    albedo = seg.albedo
    if grey:
        albedo = np.repeat(albedo @ np.array([0.3, 0.59, 0.11])[:, None], 3, axis=1)
    diffuse_weight = np.where(code == TRANSPARENT, 0.0, 1.0 - reflectance)
    irradiance = np.broadcast_to(ambient, albedo.shape).copy()
    specular = np.zeros_like(albedo)
    for light in lights:
        vis, pattern_through = light_visibility(scene, seg, light)
        if light.position is not None:
            to_light = light.position - seg.points
            dist2 = np.maximum(np.einsum("ij,ij->i", to_light, to_light), 1e-6)
            ldir, power = _unit(to_light), vis / dist2
        else:
            ldir, power = np.broadcast_to(light.direction, seg.points.shape), vis
        if light.pattern is not None:
            pattern = np.zeros(len(hit))
            pattern[hit] = light.pattern(seg.points[hit], seg.footprint[hit])
            surviving = contrast * pattern_through
            power = power * (light.pattern_mean + surviving * (pattern - light.pattern_mean))
        cos_l = np.clip(np.einsum("ij,ij->i", seg.normal, ldir), 0, None)
        irradiance += (power * cos_l)[:, None] * light.color
        half = _unit(ldir - seg.view)
        cos_h = np.clip(np.einsum("ij,ij->i", seg.normal, half), 0, None)
        specular += (power * highlight * (cos_l > 0) * cos_h**shininess)[:, None] * light.color
    out = diffuse_weight[:, None] * albedo * irradiance + specular
    return np.where(hit[:, None], out, sky)


def shade(trace_: Trace, scene: Scene, lights: list[Light], ambient, sky_fn, grey: bool = False) -> np.ndarray:
    """Sum the weighted radiance of all segments of a trace into an (H*W, 3) linear image."""
    image = np.zeros((trace_.depth.size, 3))
    for seg in trace_.segments:
        sky = sky_fn(seg.view)
        image[seg.pixel] += seg.weight[:, None] * radiance(scene, seg, lights, ambient, sky, grey)
    return image
