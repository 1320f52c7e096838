"""DAVIS-layout folders written with PIL for the evaluation tests (no PyAV, so the GPU
check's tests, which run where PyAV is missing, can use them too)."""
from pathlib import Path

import numpy as np
from PIL import Image

from tcore.eval.io import write_label_png


def write_davis(root: Path, sequences: dict[str, np.ndarray], frames: dict | None = None) -> Path:
    """A DAVIS layout from id maps {name: [T,H,W]} (frames: grey images unless given)."""
    for name, labels in sequences.items():
        for t, label in enumerate(labels):
            write_label_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", label)
            image = (frames[name][t] if frames else
                     np.full((*label.shape, 3), 100, dtype=np.uint8))
            path = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, quality=95)
    split = root / "ImageSets" / "2017" / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f"{name}\n" for name in sequences))
    return root


def moving_squares(frames=6, size=(24, 32)):
    labels = np.zeros((frames, *size), dtype=np.uint8)
    for t in range(frames):
        labels[t, 4:12, 2 + t:10 + t] = 1
        labels[t, 14:20, 20:28] = 2
    return labels


def textured_frames(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Frames [T,H,W,3] for id maps [T,H,W]: a fixed noise background with each object in
    its own noisy colour, so that a random backbone's features tell the places apart."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (*labels.shape[1:], 3))
    colours = rng.integers(0, 256, (int(labels.max()) + 1, 3))
    frames = np.where(labels[..., None] > 0, colours[labels], background[None])
    noise = rng.integers(-20, 21, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)
