"""Block-wise masks of the current frame's global crops (METHOD.md section 3).

Drawn on the host per batch from a generator seeded by the batch, so a resumed run redraws
the same masks. `mask_tensors` also derives the flat indices, per-token weights and count
the loss uses, so it needs no host synchronisation on the device.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from tcore.pipelines.config import MaskConfig


# Block attempts are drawn this many at a time: one generator call per chunk instead of four
# per attempt (a batch of 64 clips masks 64 crops, each over several blocks and attempts).
ATTEMPT_CHUNK = 32


def attempt_uniforms(rng: np.random.Generator) -> Iterator[list[float]]:
    """Four uniforms per block attempt (area, aspect, top, left), endlessly."""
    while True:
        yield from rng.random((ATTEMPT_CHUNK, 4)).tolist()


def _add_block(attempts: Iterator[list[float]], rows: list[int], width: int,
               max_patches: int, cfg: MaskConfig) -> int:
    """One block of area U(min, max_patches) and log-aspect U(log a, -log a); up to `tries`
    attempts, each accepted only if it adds between 1 and max_patches new patches.

    The mask is `rows`, one int per grid row whose bit j is column j (set bits are masked):
    a block's overlap is then a popcount per row, with no array operation per attempt."""
    height = len(rows)
    log_low = math.log(cfg.min_aspect)
    log_span = math.log(1 / cfg.min_aspect) - log_low
    added = 0
    for _ in range(cfg.block_tries):
        u_area, u_aspect, u_top, u_left = next(attempts)
        # Python's random.uniform semantics: max_patches may be below the minimum.
        target_area = cfg.min_block_patches + (max_patches - cfg.min_block_patches) * u_area
        aspect = math.exp(log_low + log_span * u_aspect)
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(u_top * (height - h + 1))          # uniform on the positions
            left = int(u_left * (width - w + 1))
            bits = ((1 << w) - 1) << left
            block_rows = range(top, top + h)
            new = h * w - sum((rows[r] & bits).bit_count() for r in block_rows)
            if 0 < new <= max_patches:
                for r in block_rows:
                    rows[r] |= bits
                added += new
        if added > 0:
            break
    return added


def rows_to_mask(rows: list[int], width: int) -> np.ndarray:
    """[len(rows), width] bool from the rows' bits (bit j: column j)."""
    row_bytes = (width + 7) // 8
    packed = np.frombuffer(b"".join(r.to_bytes(row_bytes, "little") for r in rows), np.uint8)
    bits = np.unpackbits(packed.reshape(len(rows), row_bytes), axis=1, bitorder="little")
    return bits[:, :width].astype(bool)


# A block whose tries all fail is drawn again, as in the reference, until the crop has its
# count; this many failures in a row end the crop short instead of looping for ever on a
# grid no block fits (a 1 x 1 grid). At the paper's sizes the most seen in a row is a few.
MAX_FAILED_BLOCKS = 1000


def block_mask(rng: np.random.Generator, grid: int, n_patches: int,
               cfg: MaskConfig) -> np.ndarray:
    """A [grid, grid] bool mask with n_patches True, made of rectangular blocks."""
    rows = [0] * grid
    attempts = attempt_uniforms(rng)
    # The per-block cap, `fraction * img // patch * img // patch` evaluated left to right
    # (the whole grid by default, as T-CoRe passes it).
    size = grid * cfg.patch_size
    cap = int(((cfg.max_block_fraction * size) // cfg.patch_size * size) // cfg.patch_size)
    count = failed = 0
    while count < n_patches and failed < MAX_FAILED_BLOCKS:
        delta = _add_block(attempts, rows, grid, min(n_patches - count, cap), cfg)
        failed = failed + 1 if delta == 0 else 0
        count += delta
    return rows_to_mask(rows, grid)


def batch_masks(rng: np.random.Generator, n_crops: int, grid: int,
                cfg: MaskConfig) -> np.ndarray:
    """[n_crops, grid*grid] masks: int(n_crops * p) crops masked with the linspace ladder
    of ratios, the rest empty, then shuffled across the batch."""
    n_tokens = grid * grid
    if n_crops == 0:    # a batch whose every sample was skipped
        return np.zeros((0, n_tokens), dtype=bool)
    n_masked_crops = int(n_crops * cfg.mask_sample_probability)
    ladder = np.linspace(cfg.mask_ratio[0], cfg.mask_ratio[1], n_masked_crops + 1)
    masks = []
    for i in range(n_masked_crops):
        count = int(n_tokens * rng.uniform(ladder[i], ladder[i + 1]))
        masks.append(block_mask(rng, grid, count, cfg))
    masks += [np.zeros((grid, grid), dtype=bool)] * (n_crops - n_masked_crops)
    order = rng.permutation(n_crops)
    return np.stack([masks[i] for i in order]).reshape(n_crops, n_tokens)


def mask_tensors(masks: np.ndarray) -> dict:
    """masks, mask_indices, mask_weights, n_masked of the batch contract (CPU tensors)."""
    import torch   # here, not above: stage A's process imports this module and no torch

    flat = np.ascontiguousarray(masks, dtype=bool)
    indices = np.flatnonzero(flat).astype(np.int64)
    per_crop = np.maximum(flat.sum(-1), 1).astype(np.float32)
    weights = np.broadcast_to((np.float32(1.0) / per_crop)[:, None], flat.shape)[flat]
    return {"masks": torch.from_numpy(flat), "mask_indices": torch.from_numpy(indices),
            "mask_weights": torch.from_numpy(np.ascontiguousarray(weights)),
            "n_masked": torch.tensor([indices.size], dtype=torch.int64)}
