"""Overlay strips: a row of frames with propagated masks or keypoints drawn on them."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from tcore.eval.io import davis_palette, write_png


def pick_frames(n_frames: int, count: int = 6) -> list[int]:
    """Evenly spaced frame indices, first and last included."""
    return sorted(set(np.linspace(0, n_frames - 1, min(count, n_frames)).round().astype(int)))


def _strip(images: list[np.ndarray], height: int = 160) -> np.ndarray:
    resized = []
    for image in images:
        scale = height / image.shape[0]
        size = (max(1, int(round(image.shape[1] * scale))), height)
        resized.append(np.array(Image.fromarray(image).resize(size, Image.BILINEAR)))
    return np.concatenate(resized, axis=1)


def mask_strip(path, frames: np.ndarray, labels: np.ndarray, count: int = 6,
               alpha: float = 0.5) -> None:
    """Frames [T,H,W,3] with id maps [T,H,W] blended in the DAVIS palette, side by side."""
    palette = davis_palette()
    images = []
    for t in pick_frames(len(frames), count):
        colour = palette[labels[t]].astype(np.float32)
        blend = frames[t].astype(np.float32)
        on = labels[t] > 0
        blend[on] = (1 - alpha) * blend[on] + alpha * colour[on]
        images.append(blend.clip(0, 255).astype(np.uint8))
    write_png(path, _strip(images))


def keypoint_strip(path, frames: np.ndarray, keypoints: np.ndarray, count: int = 6) -> None:
    """Frames [T,H,W,3] with keypoints [2,J,T] (pixels, negative = missing) drawn as dots."""
    palette = davis_palette()
    images = []
    for t in pick_frames(len(frames), count):
        image = Image.fromarray(frames[t].copy())
        draw = ImageDraw.Draw(image)
        radius = max(2, frames.shape[1] // 80)
        for j in range(keypoints.shape[1]):
            x, y = float(keypoints[0, j, t]), float(keypoints[1, j, t])
            if x < 0 or y < 0:
                continue
            colour = tuple(int(c) for c in palette[j + 1])
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        images.append(np.array(image))
    write_png(path, _strip(images))
