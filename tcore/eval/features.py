"""Dense features for label propagation: frozen backbone patch tokens as L2-normalised maps.

Works with any callable `images [B,3,H,W] -> patch tokens [B,N,D]` (row-major grid), so the
propagation can be tested without a particular model.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PatchEncoder = Callable[[torch.Tensor], torch.Tensor]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(backbone, device=None) -> torch.device:
    """The device to evaluate on: `device` when given, else the backbone's own device (so a
    model handed over by the trainer stays where it is), else CUDA when present."""
    if device is not None:
        return torch.device(device)
    parameters = getattr(backbone, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return default_device()


@contextlib.contextmanager
def frozen(backbone):
    """Evaluation mode (no drop path / dropout) for the duration, then the previous mode."""
    was_training = bool(getattr(backbone, "training", False))
    if backbone is not None and hasattr(backbone, "eval"):
        backbone.eval()
    try:
        yield backbone
    finally:
        if was_training:
            backbone.train()


def evaluates_frozen(evaluate):
    """Decorator: run evaluate(backbone, ...) with the backbone in eval mode."""
    @functools.wraps(evaluate)
    def wrapper(backbone, *args, **kwargs):
        with frozen(backbone):
            return evaluate(backbone, *args, **kwargs)
    return wrapper


def patch_size_of(backbone, default: int = 16) -> int:
    """Patch size of a timm-style ViT (patch_embed.patch_size), else `default`."""
    embed = getattr(backbone, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return default
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def backbone_patch_encoder(backbone) -> PatchEncoder:
    """images -> final-norm patch tokens [B,N,D] of a tcore Backbone (registers/cls dropped)."""
    def encode(images: torch.Tensor) -> torch.Tensor:
        return backbone.forward_features(images)["patch"]
    return encode


def check_input_size(size: tuple[int, int], patch: int) -> tuple[int, int]:
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0 or height % patch or width % patch:
        nearest = "x".join(str(max(patch, round(side / patch) * patch)) for side in (height, width))
        raise ValueError(f"input size {height}x{width} must be positive multiples of the patch "
                         f"size {patch} (the nearest: {nearest}; --size sets it)")
    return height, width


def short_side_size(frame_hw: tuple[int, int], short_side: int, patch: int) -> tuple[int, int]:
    """Input size with the short side = short_side and the aspect ratio kept, both sides
    rounded to the nearest multiple of the patch size."""
    height, width = frame_hw
    scale = short_side / min(height, width)
    return (max(patch, int(round(height * scale / patch)) * patch),
            max(patch, int(round(width * scale / patch)) * patch))


def long_side_size(frame_hw: tuple[int, int], long_side: int, multiple: int = 64
                   ) -> tuple[int, int]:
    """The released code's VIP input size (the CropMAE loader it uses): the long side =
    long_side, the other side scaled with it and floored to a multiple of `multiple` (16:9
    frames at 880 give 448 x 880, squashing the aspect a little)."""
    height, width = frame_hw
    if width >= height:
        other = int(height * long_side / width) // multiple * multiple
        return max(multiple, other), long_side
    other = int(width * long_side / height) // multiple * multiple
    return long_side, max(multiple, other)


def native_size(frame_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """The frame's own size rounded down to multiples of the patch size."""
    return (max(patch, frame_hw[0] // patch * patch), max(patch, frame_hw[1] // patch * patch))


def prepare_frames(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 RGB frames [T,H,W,3] -> ImageNet-normalised float [T,3,h,w] at `size`.

    Bilinear resize without antialiasing (the reference evaluation's cv2 INTER_LINEAR).
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if tuple(video.shape[-2:]) != tuple(size):
        video = F.interpolate(video, size=tuple(size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (video - mean) / std


@torch.no_grad()
def extract_features(encode: PatchEncoder, frames: np.ndarray, size: tuple[int, int], *,
                     patch: int = 16, batch_size: int = 8, device=None) -> torch.Tensor:
    """uint8 RGB frames [T,H,W,3] -> [T, h/patch, w/patch, D] L2-normalised float32 features
    on `device`, at input size `size` = (h, w). Frames are resized and normalised one batch
    at a time, so only the uint8 video and the feature maps are held in memory."""
    device = torch.device(device) if device is not None else default_device()
    height, width = check_input_size(size, patch)
    grid = (height // patch, width // patch)
    maps = []
    for start in range(0, frames.shape[0], batch_size):
        batch = prepare_frames(frames[start:start + batch_size], (height, width))
        tokens = encode(batch.to(device, non_blocking=True))
        if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"encoder returned {tuple(tokens.shape)} for {height}x{width} "
                             f"images; expected [B, {grid[0] * grid[1]}, D] patch tokens")
        tokens = F.normalize(tokens.float(), dim=-1)
        maps.append(tokens.reshape(tokens.shape[0], grid[0], grid[1], -1))
    return torch.cat(maps)


def labels_to_grid(onehot: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """One-hot (or soft) labels [H,W,C] -> [h,w,C] at feature resolution (bilinear)."""
    maps = torch.as_tensor(onehot, dtype=torch.float32).permute(2, 0, 1)[None]
    maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
    return maps[0].permute(1, 2, 0).contiguous()


def upsample_labels(soft: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft labels [h,w,C] -> [H,W,C] (bilinear) at the annotation's resolution."""
    maps = soft.permute(2, 0, 1)[None].float()
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[0].permute(1, 2, 0)
