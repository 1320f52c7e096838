"""The frozen backbone `tcore eval` measures, from any checkpoint layout tcore.models reads."""
from __future__ import annotations

from pathlib import Path

import torch

from tcore.models import ARCHS, load_reference


def load_eval_backbone(path, arch: str | None = None, device=None):
    """Backbone of a checkpoint, frozen, in eval mode, on `device`.

    Accepts a reference T-CoRe checkpoint (also wrapped as in the reference fixture), a DINOv2
    backbone state dict, our teacher_backbone.safetensors and our `tcore train` checkpoints
    (their EMA teacher, built from the checkpoint's own model config). `arch` supplies the
    head count for state dicts (they do not store it) and is checked against the width.
    """
    path = Path(path)
    num_heads = None
    if arch is not None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        num_heads = ARCHS[arch].num_heads
    backbone = load_reference(path, num_heads=num_heads).backbone
    if arch is not None and backbone.embed_dim != ARCHS[arch].embed_dim:
        raise ValueError(f"{path}: backbone width {backbone.embed_dim} does not match --arch "
                         f"{arch} ({ARCHS[arch].embed_dim})")
    backbone.eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone


def random_backbone(arch: str, seed: int = 0, device=None):
    """A randomly initialised backbone (the baseline a trained model is compared with)."""
    from tcore.models import build_backbone
    torch.manual_seed(seed)
    backbone = build_backbone(arch, drop_path=0.0).eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone
