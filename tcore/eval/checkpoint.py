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
    head count for state dicts (they do not store it) and is checked against the width and
    the depth (a state dict cut short would otherwise load as a shallower network). Head
    and PMM, which evaluation does not use, are not read.
    """
    path = Path(path)
    num_heads = None
    if arch is not None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r} (--arch); choose one of {sorted(ARCHS)}")
        num_heads = ARCHS[arch].num_heads
    backbone = load_reference(path, num_heads=num_heads, backbone_only=True).backbone
    if arch is not None:
        check_arch(backbone, arch, path)
    backbone.eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone


def check_arch(backbone, arch: str, path) -> None:
    """The loaded backbone has --arch's width and depth."""
    spec = ARCHS[arch]
    found = (backbone.embed_dim, len(backbone.blocks))
    if found != (spec.embed_dim, spec.depth):
        raise ValueError(f"{path}: backbone of width {found[0]} and {found[1]} blocks does not "
                         f"match --arch {arch} (width {spec.embed_dim}, {spec.depth} blocks)")


def backbone_sizes(backbone) -> dict:
    """What results.json records of the evaluated network (its sizes as loaded)."""
    sizes = backbone.arch_kwargs
    return {key: sizes[key] for key in ("embed_dim", "depth", "num_heads", "patch_size",
                                        "registers")}


def random_backbone(arch: str, seed: int = 0, device=None):
    """A randomly initialised backbone (the baseline a trained model is compared with)."""
    from tcore.models import build_backbone
    torch.manual_seed(seed)
    backbone = build_backbone(arch, drop_path=0.0).eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone
