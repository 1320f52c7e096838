"""Propagate a first-frame label map (object or part ids) through a video: features ->
soft labels at feature resolution -> bilinear upsampling to the input size -> argmax ->
nearest-neighbour resize to the annotation's size -> ids."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tcore.eval.features import (PatchEncoder, extract_features, labels_to_grid,
                                 upsample_labels)
from tcore.eval.propagation import propagate_labels


@dataclass(frozen=True)
class PropagationSettings:
    """The protocol's knobs (METHOD.md section 7 defaults)."""
    topk: int = 7
    radius: float = 20
    temperature: float = 0.7
    context: int = 20
    batch_size: int = 8
    chunk_size: int = 1024

    def __post_init__(self):
        # checked up front: 0 or a negative count otherwise fails deep in range() / torch.cat
        for name in ("topk", "context", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def as_dict(self) -> dict:
        return dict(topk=self.topk, radius=self.radius, temperature=self.temperature,
                    context=self.context, long_memory=[0])


def label_set(first_labels: np.ndarray, ignore: tuple[int, ...] = (255,)) -> np.ndarray:
    """Sorted ids present in the first frame, background 0 always included."""
    ids = set(int(v) for v in np.unique(first_labels)) - set(ignore)
    ids.add(0)
    return np.array(sorted(ids), dtype=np.int64)


def onehot(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[H,W] ids -> [H,W,C] float32 one-hot over `ids` (other values, e.g. void, all zero)."""
    return (labels[..., None] == ids[None, None, :]).astype(np.float32)


def propagate_segmentation(encode: PatchEncoder, frames: np.ndarray, first_labels: np.ndarray,
                           *, size: tuple[int, int], patch: int,
                           settings: PropagationSettings, device,
                           first_read_out: bool = False,
                           centred_nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predict id maps for every frame of a video.

    frames: [T,H,W,3] uint8; first_labels: [H',W'] ids of frame 0 (annotation resolution).
    Returns (predictions [T,H',W'] uint8, ids used). Frame 0 is first_labels, or with
    `first_read_out` what the released code writes for it: its labels at the feature grid,
    read out as every other frame is. `centred_nearest`: the id maps resized to the
    annotation's size as PIL's nearest does (VIP's released scorer), not OpenCV's (DAVIS's).
    """
    ids = label_set(first_labels)
    features = extract_features(encode, frames, size, patch=patch,
                                batch_size=settings.batch_size, device=device)
    grid = tuple(features.shape[1:3])
    first_soft = labels_to_grid(onehot(first_labels, ids), grid).to(features.device)
    soft = propagate_labels(features, first_soft, topk=settings.topk, radius=settings.radius,
                            temperature=settings.temperature, context=settings.context,
                            chunk_size=settings.chunk_size)
    out_size = first_labels.shape
    predictions = np.empty((frames.shape[0], *out_size), dtype=np.uint8)
    ids_t = torch.as_tensor(ids, device=soft.device)
    def read_out(labels):
        return ids_t[hard_labels(labels, size, out_size, centred_nearest)].cpu().numpy()
    predictions[0] = read_out(first_soft) if first_read_out else first_labels
    for t in range(1, frames.shape[0]):
        predictions[t] = read_out(soft[t])
    return predictions, ids


def hard_labels(soft: torch.Tensor, input_size: tuple[int, int],
                out_size: tuple[int, int], centred_nearest: bool = False) -> torch.Tensor:
    """Soft labels [h,w,C] -> label indices [H',W'] as the reference reads them out: upsampled
    (bilinear) to the network's input size, the argmax taken there, then resized by nearest
    neighbour to the annotation's size (its dump_predictions, then convert_davis). The argmax
    at the annotation's size instead moves boundary pixels. The nearest neighbour of output
    pixel i is source pixel floor(i * in / out) as OpenCV's INTER_NEAREST computes it (DAVIS's
    convert_davis), or with `centred_nearest` floor((i + 0.5) * in / out) as PIL's NEAREST
    does (the VIP scorer the released code uses); both index maps are the libraries' own."""
    at_input = upsample_labels(soft, input_size).argmax(-1)
    if tuple(at_input.shape) == tuple(out_size):
        return at_input
    sources = pil_nearest_sources if centred_nearest else opencv_nearest_sources
    rows, cols = (torch.tensor(sources(n, m), device=at_input.device)
                  for n, m in zip(at_input.shape, out_size))
    return at_input[rows][:, cols]


@functools.lru_cache(maxsize=64)   # every frame of a video asks for the same sizes
def opencv_nearest_sources(size: int, out: int) -> np.ndarray:
    """The source index of each of `out` pixels when OpenCV's INTER_NEAREST resizes `size` to
    `out`: floor(i * (1 / (out / size))) in double precision, as its resize does (the same
    indices as cv2.resize for 8,229 size pairs, OpenCV 5.0.0, 2026-11-29). torch's "nearest"
    works in float32 and lands one pixel off at some of them (880 -> 910: 9 of 910)."""
    scale = 1.0 / (out / size)
    sources = np.minimum(np.floor(np.arange(out) * scale), size - 1).astype(np.int64)
    sources.flags.writeable = False   # shared by the cache
    return sources


@functools.lru_cache(maxsize=64)
def pil_nearest_sources(size: int, out: int) -> np.ndarray:
    """The source index of each of `out` pixels when PIL's NEAREST resizes `size` to `out`,
    read from PIL itself: it is floor((i + 0.5) * size / out) but where that product is a
    whole number, which PIL's rounded scale puts just below it (64 -> 96: pixel 4 reads 2,
    not 3), whereas torch's nearest-exact takes the whole number."""
    ramp = Image.fromarray(np.arange(size, dtype=np.int32)[None])
    sources = np.asarray(ramp.resize((out, 1), Image.NEAREST))[0].astype(np.int64)
    sources.flags.writeable = False   # shared by the cache
    return sources
