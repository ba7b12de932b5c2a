"""The demo world: a small procedural landscape (grass, stones, coloured pillars, sky and
mountains) seen by a first-person camera, ray-cast with numpy. Only the camera's pose
decides a frame, and only the actions move the camera, so a model can learn the controls
from its frames alone."""

import math
import random
from dataclasses import dataclass

import numpy as np

DEMO_WALK = 0.25                     # metres per frame with W or S (6 m/s at 25 fps)
DEMO_STRAFE = 0.2                    # metres per frame with A or D
DEMO_EYE = 1.7                       # camera height, metres
DEMO_FOV = 60.0                      # vertical field of view, degrees
DEMO_HEIGHT, DEMO_WIDTH = 176, 320   # half of 352x640: the model's aspect, sides multiples of 16


@dataclass(frozen=True)
class DemoCamera:
    x: float = 0.0                   # metres; x is right and z forward at yaw 0
    z: float = 0.0
    yaw: float = 0.0                 # degrees, positive turned right
    pitch: float = 0.0               # degrees, positive looking up

    def step(self, keys: str, mouse_x: float, mouse_y: float) -> "DemoCamera":
        """The camera after one frame of input: the mouse turns (mouse_x yaw, mouse_y pitch,
        in degrees), then W/S walk along and A/D strafe across the new heading."""
        yaw, pitch = self.yaw + mouse_x, self.pitch + mouse_y
        forward = DEMO_WALK * (("W" in keys) - ("S" in keys))
        right = DEMO_STRAFE * (("D" in keys) - ("A" in keys))
        sin, cos = math.sin(math.radians(yaw)), math.cos(math.radians(yaw))
        return DemoCamera(self.x + forward * sin + right * cos, self.z + forward * cos - right * sin, yaw, pitch)


def _hash_bits(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """Fixed pseudo-random uint32 bits per integer lattice point (no period in practice)."""
    h = ix.astype(np.uint32, copy=False) * np.uint32(0x8DA6B343) ^ iz.astype(np.uint32, copy=False) * np.uint32(0xD8163841)
    h ^= np.uint32((salt * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h


def _hash01(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    return _hash_bits(ix, iz, salt).astype(np.float32) * np.float32(1 / 2**32)


def _value_noise(x: np.ndarray, z: np.ndarray, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features about one unit apart."""
    fx, fz = np.floor(x), np.floor(z)
    tx, tz = x - fx, z - fz
    sx, sz = tx * tx * (3 - 2 * tx), tz * tz * (3 - 2 * tz)
    ix, iz = fx.astype(np.int32).view(np.uint32), fz.astype(np.int32).view(np.uint32)  # wraps like ints
    one = np.uint32(1)
    a, b = _hash01(ix, iz, salt), _hash01(ix + one, iz, salt)
    c, d = _hash01(ix, iz + one, salt), _hash01(ix + one, iz + one, salt)
    return (a + (b - a) * sx) + ((c + (d - c) * sx) - (a + (b - a) * sx)) * sz


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def _mix(a, b, t: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t[..., None]


_HAZE = (0.74, 0.80, 0.86)


def _ground_colour(px, pz, distance, footprint) -> np.ndarray:
    """Grass and dry earth in large patches, mid and fine detail, scattered stones; detail
    fades where a pixel covers more ground than the feature (no shimmer), haze far away."""
    def fade(size):
        return np.clip(1.5 - 2 * footprint / size, 0, 1)

    broad = _value_noise(px / 9.0, pz / 9.0, 1)
    colour = _mix((0.30, 0.50, 0.20), (0.62, 0.54, 0.34), _smoothstep(0.35, 0.7, broad))
    soil = _smoothstep(0.62, 0.8, _value_noise(px / 4.0 + 50, pz / 4.0, 2))
    colour = _mix(colour, (0.36, 0.27, 0.18), soil * 0.8)
    mid = _value_noise(px / 1.2, pz / 1.2, 3) - 0.5
    fine = _value_noise(px / 0.3, pz / 0.3, 4) - 0.5
    grain = _value_noise(px / 0.08, pz / 0.08, 10) - 0.5
    colour *= (1 + 0.6 * mid * fade(1.2) + 0.6 * fine * fade(0.3) + 0.5 * grain * fade(0.08))[..., None]

    cell_x, cell_z = np.floor(px / 1.3), np.floor(pz / 1.3)
    bits = _hash_bits(cell_x.astype(np.int32).view(np.uint32), cell_z.astype(np.int32).view(np.uint32), 5)
    byte = [(bits >> np.uint32(8 * k) & np.uint32(255)).astype(np.float32) / 256 for k in range(4)]
    centre_x, centre_z = (cell_x + 0.25 + 0.5 * byte[0]) * 1.3, (cell_z + 0.25 + 0.5 * byte[1]) * 1.3
    radius = 0.08 + 0.17 * byte[2]
    stone = ((px - centre_x) ** 2 + (pz - centre_z) ** 2 < radius ** 2) & (byte[3] < 0.4)
    shade = 0.3 + 0.45 * byte[2]
    stone_colour = np.stack([shade, shade * 0.97, shade * 0.9], -1)
    colour += (stone_colour - colour) * (stone * fade(0.4))[..., None]
    return _mix(colour, _HAZE, 1 - np.exp(-distance / 70.0))


def _sky_colour(dx, dy, dz, camera: DemoCamera) -> np.ndarray:
    """Gradient sky, a cloud layer, and a mountain skyline fixed to the compass directions."""
    norm = np.sqrt(dx * dx + dy * dy + dz * dz)
    elevation = dy / norm
    colour = _mix(_HAZE, (0.22, 0.42, 0.82), np.sqrt(np.clip(elevation, 0, 1)))
    up = np.maximum(dy, 1e-3)
    cloud_x, cloud_z = dx / up * 300 + camera.x, dz / up * 300 + camera.z
    clouds = 0.65 * _value_noise(cloud_x / 220, cloud_z / 220, 11) + 0.35 * _value_noise(cloud_x / 70, cloud_z / 70, 12)
    cover = _smoothstep(0.5, 0.72, clouds) * _smoothstep(0.03, 0.15, elevation)
    colour = _mix(colour, (0.97, 0.97, 0.98), cover * 0.9)

    azimuth = np.arctan2(dx, dz)
    ridge = 0.05 + 0.03 * (np.sin(3 * azimuth + 1.0) + 0.6 * np.sin(7 * azimuth + 2.0)
                           + 0.35 * np.sin(13 * azimuth + 0.4) + 0.2 * np.sin(31 * azimuth + 3.0))
    mountain = elevation < ridge
    rock = _mix((0.42, 0.47, 0.56), (0.58, 0.62, 0.70), np.clip(1 - elevation / 0.1, 0, 1))
    return np.where(mountain[..., None], rock, colour)


def _demo_pillars() -> list[tuple]:
    """Fixed world: (x, z, radius, height, colour) of pillars scattered around the start."""
    rng = random.Random(1234)
    palette = [(0.85, 0.20, 0.15), (0.15, 0.35, 0.85), (0.95, 0.80, 0.15), (0.55, 0.20, 0.70),
               (0.10, 0.65, 0.60), (0.95, 0.50, 0.10), (0.90, 0.90, 0.88), (0.20, 0.20, 0.22)]
    pillars = []
    while len(pillars) < 40:
        x, z = rng.uniform(-30, 30), rng.uniform(-30, 30)
        if math.hypot(x, z) > 4 and all(math.hypot(x - p[0], z - p[1]) > 3.5 for p in pillars):
            pillars.append((x, z, rng.uniform(0.3, 0.9), rng.uniform(2.5, 8.0), rng.choice(palette)))
    return pillars


_PILLARS = _demo_pillars()


def render_demo_frame(camera: DemoCamera, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo world seen from camera: uint8 [height, width, 3]."""
    tan_v = math.tan(math.radians(DEMO_FOV) / 2)
    tan_h = tan_v * width / height
    u = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1) * tan_h
    v = (1 - (np.arange(height, dtype=np.float32) + 0.5) / height * 2) * tan_v
    u, v = np.broadcast_to(u[None, :], (height, width)), np.broadcast_to(v[:, None], (height, width))
    sin_p, cos_p = math.sin(math.radians(camera.pitch)), math.cos(math.radians(camera.pitch))
    sin_y, cos_y = math.sin(math.radians(camera.yaw)), math.cos(math.radians(camera.yaw))
    ry, rz = v * cos_p + sin_p, cos_p - v * sin_p          # pitch about the camera's x axis
    dx, dy, dz = u * cos_y + rz * sin_y, ry, rz * cos_y - u * sin_y  # then yaw about the vertical

    # Without roll the horizon is a row: sky above, ground below.
    horizon = int(np.searchsorted(-dy[:, 0], 1e-6))
    sky, ground = slice(0, horizon), slice(horizon, height)
    image = np.empty((height, width, 3), np.float32)
    depth = np.full((height, width), np.inf, np.float32)
    image[sky] = _sky_colour(dx[sky], dy[sky], dz[sky], camera)
    t = DEMO_EYE / -dy[ground]
    focal = (height / 2) / tan_v
    image[ground] = _ground_colour(camera.x + t * dx[ground], camera.z + t * dz[ground], t,
                                   t * t / (DEMO_EYE * focal) + t / focal)
    depth[ground] = t

    def to_screen(x, y, z):
        """World point -> (column, row, distance along the view axis)."""
        rx, ry, rz = x - camera.x, y - DEMO_EYE, z - camera.z
        side, ahead = rx * cos_y - rz * sin_y, rx * sin_y + rz * cos_y
        up, forward = ry * cos_p - ahead * sin_p, ry * sin_p + ahead * cos_p
        if forward <= 0.05:
            return None
        return ((side / forward / tan_h + 1) / 2 * width, (1 - up / forward / tan_v) / 2 * height, forward)

    for px, pz, radius, top, colour in _PILLARS:
        corners = [to_screen(px + sx, y, pz + sz) for sx in (-radius, radius) for sz in (-radius, radius)
                   for y in (0.0, top)]
        if all(c is None for c in corners):
            continue
        if any(c is None for c in corners):  # the box reaches behind the camera: test everything
            rows, cols = slice(0, height), slice(0, width)
        else:  # a box in front projects inside the hull of its projected corners
            cols = slice(max(0, int(min(c[0] for c in corners)) - 1), min(width, int(max(c[0] for c in corners)) + 2))
            rows = slice(max(0, int(min(c[1] for c in corners)) - 1), min(height, int(max(c[1] for c in corners)) + 2))
            if cols.start >= cols.stop or rows.start >= rows.stop:
                continue
        _draw_pillar(image[rows, cols], depth[rows, cols], dx[rows, cols], dy[rows, cols], dz[rows, cols],
                     camera.x - px, camera.z - pz, radius, top, colour)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _draw_pillar(image, depth, dx, dy, dz, ox, oz, radius, top, colour) -> None:
    """Ray-cast one vertical cylinder (offset ox, oz from the camera) into image where it is nearest."""
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    disc = b * b - 4 * a * (ox * ox + oz * oz - radius * radius)
    hit_t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-12))
    hit_y = DEMO_EYE + hit_t * dy
    hit = (disc > 0) & (hit_t > 0) & (hit_y >= 0) & (hit_y <= top) & (hit_t < depth)
    if not hit.any():
        return
    t, y = hit_t[hit], hit_y[hit]
    nx, nz = (ox + t * dx[hit]) / radius, (oz + t * dz[hit]) / radius
    stripes = 0.82 + 0.18 * (np.floor(np.arctan2(nz, nx) / (2 * math.pi) * 8) % 2)
    bands = 0.88 + 0.12 * (np.floor(y / 0.5) % 2)
    light = 0.45 + 0.55 * np.maximum(0, 0.6 * nx - 0.8 * nz)
    shade = (stripes * bands * light)[:, None] * np.asarray(colour, np.float32)
    shade = np.where((y > top - 0.3)[:, None], 0.95 * light[:, None], shade)  # a pale cap
    image[hit] = _mix(shade, _HAZE, 1 - np.exp(-t / 70.0))
    depth[hit] = t
