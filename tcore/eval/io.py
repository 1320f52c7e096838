"""File input/output for the benchmarks: palette PNGs, frames, atomic writes of results."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from tcore.preprocess.files import write_atomically, write_text_atomically


def davis_palette() -> np.ndarray:
    """The 256-entry palette of DAVIS / PASCAL VOC annotations ([256, 3] uint8).

    Colour of index i: bits of i spread over the high bits of r, g, b (the VOC bit trick).
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def read_name_list(path: Path) -> list[str]:
    """A list file's names, one a line (blank lines skipped). A name listed twice is refused:
    it would be scored twice and weigh double in the mean, where the official tools count
    each video once."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{path}: lists {', '.join(twice)} more than once")
    return names


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Label map [H,W] uint8 of a palette ('P') or greyscale ('L') PNG.

    RGB annotations are refused: their colours would need a palette lookup we cannot guess.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"{path}: expected a palette or greyscale label PNG, got mode "
                                 f"{image.mode!r}")
            labels = np.array(image)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read label PNG ({error})") from error
    if labels.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {labels.shape}")
    return labels


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """RGB frame [H,W,3] uint8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: frame not found")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot decode image ({error})") from error


def read_same_size(paths, read) -> np.ndarray:
    """[T, ...] stack of read(path) over `paths` (non-empty). Each image's size is compared
    with the first's so that an odd file is named (numpy's stack error names none)."""
    images = []
    for path in paths:
        image = read(path)
        if images and image.shape != images[0].shape:
            raise ValueError(f"{path}: size {size_text(image.shape)} differs from "
                             f"{paths[0]} ({size_text(images[0].shape)}); the images of one "
                             "video must all have the same size")
        images.append(image)
    return np.stack(images)


def size_text(shape) -> str:
    """'HxW' of an image shape ([H,W] or [H,W,C])."""
    return f"{shape[0]}x{shape[1]}"


def write_label_png(path: str | os.PathLike, labels: np.ndarray,
                    palette: np.ndarray | None = None) -> None:
    """Write a [H,W] label map as a palette PNG (temporary name, then rename)."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"{path}: label map must be 2-D with values in [0, 255]")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette((davis_palette() if palette is None else palette).astype(np.uint8).ravel()
                     .tolist())
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB image [H,W,3] uint8 as PNG atomically."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def write_json(path: str | os.PathLike, payload) -> None:
    """Write JSON atomically (NaN written as null so strict readers accept it)."""
    text = json.dumps(_nan_to_none(payload), indent=2, sort_keys=False) + "\n"
    write_text_atomically(path, text)


def write_mat(path: str | os.PathLike, fields: dict) -> None:
    """Write a MATLAB .mat file atomically (scipy.io.savemat)."""
    import scipy.io
    write_atomically(path, lambda temporary: scipy.io.savemat(temporary, fields, appendmat=False))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows (dicts, the union of their keys as columns, in first-seen order)."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})

    write_atomically(path, write)


def _csv_value(value):
    if isinstance(value, float):
        return "" if value != value else repr(value)
    return value


def _nan_to_none(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        return _nan_to_none(value.item())
    return value
