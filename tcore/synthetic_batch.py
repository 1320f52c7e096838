"""Device-resident synthetic batches that follow the batch contract (docs/ARCHITECTURE.md).

Used by `tcore bench model` (the model step with no data loading in the way) and by anything
else that needs a correctly shaped batch without shards. Images are standard-normal noise,
which is what normalised crops look like to the model's arithmetic. Masks follow METHOD.md
section 3 in *how many* tokens each crop masks (which is all that compute depends on); their
positions are uniform at random rather than block-wise.
"""
from __future__ import annotations

import torch

PATCH_SIZE = 16
GLOBAL_SIZE = 224
LOCAL_SIZE = 96
MASK_SAMPLE_PROBABILITY = 0.5
MASK_RATIO_RANGE = (0.1, 0.5)


def draw_mask_counts(n_crops: int, n_patches: int, generator: torch.Generator) -> list[int]:
    """Masked-token count per global crop, in METHOD.md section 3's ladder, then shuffled."""
    n_masked_crops = int(n_crops * MASK_SAMPLE_PROBABILITY)
    ladder = torch.linspace(*MASK_RATIO_RANGE, n_masked_crops + 1).tolist()
    counts = []
    for i in range(n_masked_crops):
        ratio = ladder[i] + (ladder[i + 1] - ladder[i]) * torch.rand((), generator=generator).item()
        counts.append(int(n_patches * ratio))
    counts += [0] * (n_crops - n_masked_crops)
    order = torch.randperm(n_crops, generator=generator).tolist()
    return [counts[i] for i in order]


def synthetic_masks(n_crops: int, n_patches: int, generator: torch.Generator) -> torch.Tensor:
    """[n_crops, n_patches] bool, True = masked, with the ladder's counts per crop."""
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
    for crop, count in enumerate(draw_mask_counts(n_crops, n_patches, generator)):
        if count:
            masks[crop, torch.randperm(n_patches, generator=generator)[:count]] = True
    return masks


def mask_index_tensors(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mask_indices`, `mask_weights` and `n_masked` derived from a [2B, N] mask (contract)."""
    per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    flat = masks.flatten()
    indices = flat.nonzero().flatten().to(torch.int64)
    weights = (1.0 / per_crop).expand_as(masks).flatten()[indices].contiguous()
    return {
        "mask_indices": indices,
        "mask_weights": weights,
        "n_masked": torch.tensor([indices.numel()], dtype=torch.int64),
    }


def make_synthetic_batch(
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    n_local: int = 8,
    global_size: int = GLOBAL_SIZE,
    local_size: int = LOCAL_SIZE,
    patch_size: int = PATCH_SIZE,
    dtype: torch.dtype = torch.float32,
    n_classes: int = 400,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch dict with every contract key, shapes and dtypes, resident on `device`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if global_size % patch_size:
        raise ValueError(f"global_size {global_size} is not a multiple of patch_size {patch_size}")
    generator = torch.Generator().manual_seed(seed)
    n_patches = (global_size // patch_size) ** 2

    def images(count: int, size: int) -> torch.Tensor:
        return torch.randn(count, 3, size, size, generator=generator, dtype=torch.float32).to(dtype)

    masks = synthetic_masks(2 * batch_size, n_patches, generator)
    current = torch.randint(6, 14, (batch_size,), generator=generator)
    offsets = torch.randint(3, 6, (batch_size, 2), generator=generator)
    batch = {
        "global_crops": images(2 * batch_size, global_size),
        "local_crops": images(n_local * batch_size, local_size),
        "past_crops": images(2 * batch_size, global_size),
        "future_crops": images(2 * batch_size, global_size),
        "masks": masks,
        **mask_index_tensors(masks),
        "frame_indices": torch.stack(
            [current - offsets[:, 0], current, current + offsets[:, 1]], dim=1),
        "labels": torch.randint(0, n_classes, (batch_size,), generator=generator),
    }
    device = torch.device(device)
    return {key: value.to(device) for key, value in batch.items()}
