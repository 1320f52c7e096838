"""The frozen backbone `tcore eval` measures, from any checkpoint layout tcore.models reads."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from tcore.models import ARCHS, CheckpointError, load_reference


def _unwrap_fixture(path: Path) -> dict | None:
    """The reference fixture (official_tiny.pt) keeps its checkpoint under "checkpoint" next to
    test inputs/outputs; return that inner checkpoint, else None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    inner = payload.get("checkpoint") if isinstance(payload, dict) else None
    return inner if isinstance(inner, dict) and isinstance(inner.get("teacher"), dict) else None


def _read_training_checkpoint(path: Path) -> dict | None:
    """A `tcore train` checkpoint ({"model": TCoRe state, "config": {"model": ...}, ...}), or
    None when the file is not one.

    Those files also hold numpy RNG state, which torch's weights-only reader refuses; numpy
    array reconstruction (and nothing else) is allowed here, so no arbitrary pickle runs.
    """
    import importlib

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    if any(not name.startswith("numpy.") for name in needed):
        return None
    allowed = []
    for name in needed:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    # numpy dtype classes (e.g. UInt32DType) are met only while unpickling the arrays
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not (isinstance(payload, dict) and isinstance(payload.get("model"), dict)
            and isinstance(payload.get("config"), dict)
            and isinstance(payload["config"].get("model"), dict)):
        return None
    return payload


def _backbone_from_training(path: Path, payload: dict):
    """The EMA teacher's backbone of a `tcore train` checkpoint (our own key layout)."""
    from tcore.models import build_backbone
    cfg = payload["config"]["model"]
    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: training checkpoint without teacher.backbone.* weights")
    options = {key: cfg[key] for key in ("patch_size", "registers", "layerscale", "img_size")
               if key in cfg}
    backbone = build_backbone(cfg.get("arch", "vit_small"), drop_path=0.0, **options)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: teacher backbone does not fit arch "
                              f"{cfg.get('arch')!r}: {error}") from error
    return backbone


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
    backbone = _load_any(path, num_heads)
    if arch is not None and backbone.embed_dim != ARCHS[arch].embed_dim:
        raise ValueError(f"{path}: backbone width {backbone.embed_dim} does not match --arch "
                         f"{arch} ({ARCHS[arch].embed_dim})")
    backbone.eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone


def _load_any(path: Path, num_heads: int | None):
    training = _read_training_checkpoint(path) if path.suffix != ".safetensors" else None
    if training is not None:
        return _backbone_from_training(path, training)
    try:
        return load_reference(path, num_heads=num_heads).backbone
    except CheckpointError:
        inner = _unwrap_fixture(path)
        if inner is None:
            raise
    fd, tmp = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(inner, tmp)
        return load_reference(tmp, num_heads=num_heads).backbone
    finally:
        os.unlink(tmp)


def random_backbone(arch: str, seed: int = 0, device=None):
    """A randomly initialised backbone (the baseline a trained model is compared with)."""
    from tcore.models import build_backbone
    torch.manual_seed(seed)
    backbone = build_backbone(arch, drop_path=0.0).eval().requires_grad_(False)
    if device is not None:
        backbone.to(device)
    return backbone
