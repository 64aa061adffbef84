"""Procedural street-like scenes in the Cityscapes directory layout, for demos and tests.

    generate("/tmp/synth", "train", count=64, height=128, width=256, seed=0)

writes `leftImg8bit/{split}/synth/synth_{i:06d}_000019_leftImg8bit.png` photos and the matching
`gtFine/.../*_gtFine_labelIds.png` (official labelIds) and `*_gtFine_color.png` labels, so the
Cityscapes converter reads them with either label route. A scene has sky, buildings with windows,
a road in perspective with lane marks, sidewalks, terrain, trees, poles with signs, cars and
people, each drawn with its own texture, per-instance colour, shading and noise: layout -> photo
is learnable but not a fixed colour table. Deterministic for a given seed; ~60 ms per 128x256
scene (three PNGs written) on one core.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from crn_tf import data, labels

# Official Cityscapes labelIds of the classes drawn (see labels.CITYSCAPES_LABELID_TO_TRAINID).
EGO_VEHICLE, ROAD, SIDEWALK, BUILDING, FENCE, POLE = 1, 7, 8, 11, 13, 17
TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 20, 21, 22, 23, 24, 26


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: photo uint8 [H, W, 3], labelIds uint8 [H, W]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width  # [H, W] in [0, 1)
    ids = np.zeros((height, width), np.uint8)
    img = np.zeros((height, width, 3), np.float32)

    def noise(scale: float) -> np.ndarray:
        return rng.normal(0, scale, (height, width, 1)).astype(np.float32)

    def paint(mask: np.ndarray, label: int, rgb: np.ndarray) -> None:
        ids[mask] = label
        img[mask] = np.broadcast_to(rgb, img.shape)[mask]

    horizon = rng.uniform(0.35, 0.5)
    vx = rng.uniform(0.35, 0.65)  # vanishing point x
    # Sky: vertical gradient, lighter towards the horizon, slight haze noise.
    top, low = rng.uniform([40, 90, 160], [90, 140, 220]), rng.uniform([170, 190, 210], [220, 230, 245])
    t = np.clip(y / horizon, 0, 1)[..., None]
    paint(np.ones_like(ids, bool), SKY, top * (1 - t) + low * t + noise(3))
    # Buildings: blocks of random widths and heights with a window grid and per-block colour.
    x0 = 0.0
    while x0 < 1:
        bw = rng.uniform(0.08, 0.25)
        btop = rng.uniform(0.05, horizon - 0.05)
        mask = (x >= x0) & (x < x0 + bw) & (y >= btop) & (y < horizon + 0.03)
        base = rng.uniform(60, 170) + rng.uniform(-25, 25, 3)
        fx, fy = rng.uniform(30, 60), rng.uniform(15, 35)
        windows = ((np.sin(x * fx * np.pi * 2) > 0.3) & (np.sin(y * fy * np.pi * 2) > 0.2))[..., None]
        shade = (0.75 + 0.35 * (y - btop) / max(horizon - btop, 1e-3))[..., None]
        paint(mask, BUILDING, (base * shade) * np.where(windows, 0.55, 1.0) + noise(6))
        x0 += bw
    # Ground in perspective: road, sidewalks, terrain beyond. d = 0 at the horizon, 1 at the bottom.
    d = np.clip((y - horizon) / (1 - horizon), 0, 1)
    ground = y >= horizon
    half_road = 0.03 + rng.uniform(0.45, 0.7) * d
    half_walk = half_road + 0.02 + rng.uniform(0.15, 0.3) * d
    dist = np.abs(x - vx)
    paint(ground, TERRAIN, rng.uniform([80, 110, 50], [120, 160, 80]) + noise(14))
    walk = rng.uniform(150, 200)
    tiles = ((np.floor(y * 60 / (0.2 + d)) % 2) * 12)[..., None]
    paint(ground & (dist < half_walk), SIDEWALK, walk + tiles - 40 * (1 - d[..., None]) + noise(6))
    asphalt = rng.uniform(60, 100)
    road_rgb = np.array([asphalt, asphalt, asphalt + 8]) * (0.8 + 0.3 * d[..., None]) + noise(9)
    lane = (np.abs(x - vx) < 0.004 + 0.01 * d) & (np.sin(d * 40) > 0)
    road_rgb = np.where(lane[..., None], 225.0, road_rgb)
    paint(ground & (dist < half_road), ROAD, road_rgb)
    # A fence segment along one sidewalk edge, sometimes.
    if rng.random() < 0.5:
        side = rng.choice([-1, 1])
        edge = vx + side * half_walk
        mask = ground & (np.abs(x - edge) < 0.01 + 0.02 * d) & (d > 0.1) & (d < 0.6)
        paint(mask, FENCE, rng.uniform(120, 170) * np.where((x * 200 % 2) < 1, 1.0, 0.7)[..., None] + noise(5))

    def along_edge(depth: float, side: int) -> float:
        """x of the sidewalk at depth d (0 horizon .. 1 bottom) on one side."""
        row = min(int((horizon + depth * (1 - horizon)) * height), height - 1)
        return float(vx + side * (half_road[row, 0] + half_walk[row, 0]) / 2)

    # Trees: crowns with leafy noise on trunks, along the sidewalks.
    for _ in range(rng.integers(1, 5)):
        depth, side = rng.uniform(0.05, 0.8), rng.choice([-1, 1])
        cx, by = along_edge(depth, side) + side * 0.05, horizon + depth * (1 - horizon)
        r = 0.04 + 0.15 * depth
        crown = ((x - cx) / r) ** 2 + ((y - (by - 2.2 * r)) / (1.3 * r)) ** 2 < 1
        trunk = (np.abs(x - cx) < 0.08 * r) & (y < by) & (y > by - 1.5 * r)
        green = rng.uniform([40, 80, 20], [90, 140, 50])
        leaves = (np.sin(x * 300 + rng.uniform(0, 6)) * np.sin(y * 250) > 0)[..., None] * 25
        paint(trunk, VEGETATION, np.array([80.0, 60, 40]) + noise(6))
        paint(crown, VEGETATION, green + leaves + noise(16))
    # Poles with a traffic sign.
    for _ in range(rng.integers(0, 3)):
        depth, side = rng.uniform(0.1, 0.9), rng.choice([-1, 1])
        px, by = along_edge(depth, side), horizon + depth * (1 - horizon)
        hgt, pw = 0.15 + 0.5 * depth, 0.002 + 0.008 * depth
        paint((np.abs(x - px) < pw) & (y < by) & (y > by - hgt), POLE, np.array([150.0, 150, 150]) + noise(8))
        sw, sh = 4 * pw + 0.01, 0.02 + 0.06 * depth
        sign = (np.abs(x - px) < sw) & (y > by - hgt) & (y < by - hgt + sh)
        paint(sign, TRAFFIC_SIGN, rng.choice([np.array([220.0, 200, 20]), np.array([30.0, 60, 200])]) + noise(5))
    # Cars on the road, far ones first so near ones occlude them.
    for depth in np.sort(rng.uniform(0.15, 0.95, rng.integers(1, 5))):
        by = horizon + depth * (1 - horizon)
        row = min(int(by * height), height - 1)
        cx = vx + rng.uniform(-0.8, 0.8) * half_road[row, 0]
        cw, ch = 0.05 + 0.3 * depth, 0.03 + 0.16 * depth
        body = (np.abs(x - cx) < cw / 2) & (y < by) & (y > by - ch)
        cabin = (np.abs(x - cx) < cw / 3) & (y <= by - ch) & (y > by - 1.5 * ch)
        paint_colour = rng.uniform(20, 230, 3)
        glass = ((y > by - 1.45 * ch) & (y < by - 1.05 * ch))[..., None]
        wheels = ((y > by - 0.25 * ch) & (np.abs(np.abs(x - cx) - cw * 0.32) < cw * 0.1))[..., None]
        shade = (1.1 - 0.4 * (y - (by - 1.5 * ch)) / (1.5 * ch))[..., None]
        rgb = np.where(glass, np.array([40.0, 50, 60]), paint_colour * shade)
        paint(body | cabin, CAR, np.where(wheels, 20.0, rgb) + noise(5))
    # People on the sidewalks.
    for _ in range(rng.integers(0, 4)):
        depth, side = rng.uniform(0.1, 0.9), rng.choice([-1, 1])
        px, by = along_edge(depth, side), horizon + depth * (1 - horizon)
        ph = 0.06 + 0.3 * depth
        pw = ph * 0.18
        torso = (np.abs(x - px) < pw / 2) & (y < by) & (y > by - 0.85 * ph)
        head = ((x - px) / (pw * 0.4)) ** 2 + ((y - (by - 0.92 * ph)) / (0.08 * ph)) ** 2 < 1
        clothes = np.where((y > by - 0.45 * ph)[..., None], rng.uniform(10, 90, 3), rng.uniform(40, 230, 3))
        paint(torso, PERSON, clothes + noise(8))
        paint(head, PERSON, np.array([200.0, 160, 130]) + noise(8))
    # Sometimes the bonnet of the ego vehicle at the bottom (void in trainIds, as in Cityscapes).
    if rng.random() < 0.3:
        paint(y > 0.93 - 0.03 * np.cos((x - 0.5) * 3), EGO_VEHICLE, np.array([30.0, 30, 35]) + noise(4))
    # Global exposure and sensor noise.
    img = img * rng.uniform(0.8, 1.15) + rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ids


def generate(out_dir: str, split: str, count: int, height: int = 128, width: int = 256, seed: int = 0) -> list[str]:
    """Writes `count` synthetic scenes of `split` in the Cityscapes layout under out_dir.

    Args:
        out_dir: root of the tree (leftImg8bit/ and gtFine/ are created in it; any tf.io.gfile path).
        split: split folder name.
        count: number of scenes.
        height, width: scene size in pixels.
        seed: scenes are a pure function of (seed, index).

    Returns:
        The photo paths written.
    """
    if count < 1 or height < 8 or width < 8:
        raise ValueError(f"synthetic: need count >= 1 and a size >= 8x8, got {count} scenes of {height}x{width}")
    root = out_dir.rstrip("/")
    photo_dir, label_dir = f"{root}/leftImg8bit/{split}/synth", f"{root}/gtFine/{split}/synth"
    tf.io.gfile.makedirs(photo_dir)
    tf.io.gfile.makedirs(label_dir)
    written = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        photo, label_ids = _scene(rng, height, width)
        train_ids = labels.remap_ids(label_ids, labels.CITYSCAPES_LABELID_TO_TRAINID)
        colors = labels.ids_to_colors(train_ids, labels.CITYSCAPES)
        stem = f"synth_{i:06d}_000019"
        for path, array in (
            (f"{photo_dir}/{stem}_leftImg8bit.png", photo),
            (f"{label_dir}/{stem}_gtFine_labelIds.png", label_ids),
            (f"{label_dir}/{stem}_gtFine_color.png", colors),
        ):
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(data.encode_png(array, fast=True))
        written.append(f"{photo_dir}/{stem}_leftImg8bit.png")
    return written
