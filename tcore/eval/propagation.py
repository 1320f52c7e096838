"""Semi-supervised label propagation (the CRW protocol, METHOD.md section 7).

For target frame t the context is the first frame (long memory, ground truth, no spatial
restriction) plus the previous `context` frames (their predictions as soft labels). Following
CRW, the video is conceptually padded at the front with copies of frame 0, so the short
context of frame t is frames t-context .. t-1 with negative indices clamped to 0; early frames
therefore see several copies of frame 0, exactly like the reference evaluation.

Order of operations (CRW `mem_efficient_batched_affinity`): cosine affinities between the
query locations and every context location; locations of the short context farther than
`radius` feature cells (Euclidean distance >= radius) get -1e10 added; divide by the
temperature; top-k over all context frames jointly; softmax over those k; the prediction is the
softmax-weighted sum of the k neighbours' soft labels.
"""
from __future__ import annotations

import torch

# Added to affinities outside the radius (before the temperature), as in CRW.
OUT_OF_RADIUS = -1e10


def context_frames(t: int, context: int, long_memory: tuple[int, ...] = (0,)) -> list[int]:
    """Indices of the context frames of target frame t (long memory first)."""
    if t < 1:
        raise ValueError("frame 0 is given; context is defined for t >= 1")
    short = [max(0, t - context + j) for j in range(context)]
    return list(long_memory) + short


def radius_mask(height: int, width: int, radius: float, device=None) -> torch.Tensor:
    """[hw, hw] bool: True where two feature cells lie closer than `radius` (row-major)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device),
                            torch.arange(width, device=device), indexing="ij")
    ys, xs = ys.reshape(-1).float(), xs.reshape(-1).float()
    dist = torch.sqrt((ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2)
    return dist < radius


def topk_affinity(query: torch.Tensor, keys: torch.Tensor, near: torch.Tensor, *,
                  n_long: int, topk: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights and flat key indices of the top-k neighbours of each query.

    query: [Q, D]; keys: [F, HW, D] (first n_long frames unrestricted); near: [Q, HW] bool
    radius mask for the query rows. Returns weights [Q, k] and indices [Q, k] into F*HW.
    """
    affinity = torch.einsum("qd,fkd->qfk", query, keys)
    if n_long < keys.shape[0]:
        penalty = torch.zeros_like(near, dtype=affinity.dtype).masked_fill(~near, OUT_OF_RADIUS)
        affinity[:, n_long:] += penalty[:, None, :]
    affinity = affinity.reshape(query.shape[0], -1) / temperature
    values, indices = torch.topk(affinity, topk, dim=1)
    return torch.softmax(values, dim=1), indices


@torch.no_grad()
def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, *, topk: int = 7,
                     radius: float = 20, temperature: float = 0.7, context: int = 20,
                     long_memory: tuple[int, ...] = (0,), chunk_size: int = 1024) -> torch.Tensor:
    """Propagate soft labels from frame 0 through a video.

    features: [T, h, w, D] L2-normalised feature maps; first_labels: [h, w, C] soft labels of
    frame 0 at feature resolution. Returns [T, h, w, C] soft labels (frame 0 = first_labels).
    Memory is bounded by chunk_size query rows x (1 + context) * h * w keys.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [T, h, w, D], got {tuple(features.shape)}")
    n_frames, height, width, _ = features.shape
    if first_labels.shape[:2] != (height, width):
        raise ValueError(f"first labels {tuple(first_labels.shape)} do not match the feature "
                         f"grid {height}x{width}")
    if context < 1 or topk < 1 or chunk_size < 1 or temperature <= 0:
        raise ValueError("context, topk and chunk_size must be >= 1 and temperature > 0")
    n_keys = (len(long_memory) + context) * height * width
    if topk > n_keys:
        raise ValueError(f"topk (--topk) {topk} exceeds the {n_keys} context locations "
                         f"({len(long_memory)} + {context} frames of {height}x{width} feature "
                         "cells)")
    cells = height * width
    flat = features.reshape(n_frames, cells, -1)
    labels = torch.zeros(n_frames, cells, first_labels.shape[-1], dtype=features.dtype,
                         device=features.device)
    labels[0] = first_labels.reshape(cells, -1).to(features)
    near = radius_mask(height, width, radius, device=features.device)
    for t in range(1, n_frames):
        frames = context_frames(t, context, long_memory)
        keys = flat[frames]
        context_labels = labels[frames].reshape(len(frames) * cells, -1)
        for start in range(0, cells, chunk_size):
            stop = min(start + chunk_size, cells)
            weights, indices = topk_affinity(flat[t, start:stop], keys, near[start:stop],
                                             n_long=len(long_memory), topk=topk,
                                             temperature=temperature)
            labels[t, start:stop] = (context_labels[indices] * weights[..., None]).sum(1)
    return labels.reshape(n_frames, height, width, -1)
