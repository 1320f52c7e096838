"""Reference (official T-CoRe / DINOv2) checkpoints: key mapping, loading and export.

Accepted inputs of :func:`load_reference`:
- evaluation checkpoints ``{"teacher": {"backbone.*", "dino_head.*"}}``, optionally with
  ``"auxiliary": {"auxiliary_decoder.*"}`` (the PMM);
- training checkpoints ``{"model": {"student.*", "teacher.*", "auxiliary.*"}}`` (the teacher
  and the PMM are taken);
- plain DINOv2 backbone state dicts (``cls_token``, ``pos_embed``, ``blocks.*`` ...; chunked
  ``blocks.{chunk}.{i}.*`` too);
- our own safetensors exports (:func:`export_safetensors`);
- our own ``tcore train`` checkpoints (``{"model": TCoRe state, "config": {"model": ...}}``:
  the EMA teacher and the PMM, sized by the run's config);
- the reference fixture bundle (``official_tiny.pt``: ``{"checkpoint": ..., "config": ...}``).

Layout differences handled here: the reference's ``pos_embed[:, 0]`` (added to the cls token)
is our ``cls_pos_embed`` and its ``pos_embed[:, 1:]`` our ``pos_embed`` (timm
``no_embed_class``), both ways without loss;
``register_tokens`` is timm's ``reg_token``; the PMM's ``decoder.{i}.auxiliary_*`` modules are
our ``blocks.{i}.*``.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from tcore.checkpoint import save_torch
from tcore.models.head import DINOHead
from tcore.models.pmm import PatchMatchingModule
from tcore.models.vit import ARCHS, Backbone, unfold_cls_position
from tcore.preprocess.files import write_atomically

DEFAULT_PMM_HEADS = 16
DEFAULT_PMM_ATTN_MUL = 4.0
HEAD_DIM = 64  # every DINOv2 / T-CoRe preset uses 64-dim heads (not stored in checkpoints)
_PMM_RENAMES = {
    "auxiliary_cross_attn": "cross_attn", "auxiliary_self_attn": "self_attn",
    "auxiliary_layer_norm1": "norm1", "auxiliary_layer_norm2": "norm2",
    "auxiliary_layer_norm3": "norm3", "auxiliary_linear": "linear",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a reference model (the message names the file)."""


class ReferenceModel(nn.Module):
    """What :func:`load_reference` returns: ``.backbone``, ``.head`` and ``.pmm`` (None when the
    checkpoint has no head / PMM), in eval mode on the CPU."""

    def __init__(self, backbone: Backbone, head: DINOHead | None, pmm: PatchMatchingModule | None,
                 source: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pmm = pmm
        self.source = source  # "eval", "train", "dinov2" or "safetensors"


# ----------------------------------------------------------------------------- key mapping
def backbone_from_official(state: dict, path: str = "<state dict>") -> dict:
    """Official DINOv2-layout backbone keys -> our Backbone's state dict."""
    out = {}
    for key, value in state.items():
        chunked = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
        if chunked:  # DINOv2 block_chunks > 0 layout
            key = f"blocks.{chunked.group(2)}.{chunked.group(3)}"
        if key == "register_tokens":
            key = "reg_token"
        out[key] = value
    if "pos_embed" not in out or "cls_token" not in out:
        raise CheckpointError(f"{path}: backbone has no pos_embed / cls_token")
    pos_embed = out["pos_embed"]
    out["cls_pos_embed"] = pos_embed[:, :1]
    out["pos_embed"] = pos_embed[:, 1:]
    return out


def backbone_to_official(state: dict) -> dict:
    """Our Backbone's state dict -> official keys (the cls position back in ``pos_embed``;
    zeros for a state of the earlier layout, whose ``cls_token`` holds it)."""
    out = {}
    for key, value in state.items():
        if key == "reg_token":
            key = "register_tokens"
        out[key] = value
    cls_position = out.pop("cls_pos_embed", None)
    if cls_position is None:
        cls_position = torch.zeros_like(out["pos_embed"][:, :1])
    out["pos_embed"] = torch.cat([cls_position, out["pos_embed"]], dim=1)
    return out


def pmm_from_official(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^decoder\.", "blocks.", key)
        for old, new in _PMM_RENAMES.items():
            key = key.replace(f".{old}.", f".{new}.")
        out[key] = value
    return out


def pmm_to_official(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.", "decoder.", key)
        for old, new in _PMM_RENAMES.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


def _strip(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


# What wrappers put before every key of a module's state dict: DistributedDataParallel's
# `module.`, torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_SECTIONS = ("teacher", "auxiliary", "model", "state_dict")


def _unwrapped(state: dict) -> dict:
    """A state dict saved from a wrapped module, with the wrappers' prefixes taken off (only
    when every key has one: a prefix on some keys is a name, not a wrapper)."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES
                       if all(isinstance(k, str) and k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = _strip(state, prefix)
    return state


# ----------------------------------------------------------------------------- size inference
def _backbone_from_state(state: dict, path: str, num_heads: int | None) -> tuple[Backbone, str]:
    """The backbone the state's tensors describe, and which tensors gave its sizes (a wrong
    one of those shows up as every key whose shape depends on it, so the mismatch message
    names them)."""
    try:
        dim = state["cls_token"].shape[-1]
        patch_size = state["patch_embed.proj.weight"].shape[-1]
        grid = state["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot infer the backbone size ({error!r} missing)") from error
    side = int(round(math.sqrt(grid)))
    if side * side != grid:
        raise CheckpointError(f"{path}: pos_embed holds {grid} patch positions, not a square grid")
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    layerscale = 1e-5 if "blocks.0.ls1.gamma" in state else None
    sized_from = (f"the model was sized from the file's cls_token (width {dim}), "
                  f"patch_embed.proj.weight (patch {patch_size}), pos_embed ({side}x{side} "
                  f"positions), blocks.{depth - 1}.* (depth {depth}) and "
                  f"blocks.0.mlp.fc1.weight (MLP width {hidden})")
    backbone = Backbone(embed_dim=dim, depth=depth,
                        num_heads=num_heads or max(1, dim // HEAD_DIM), patch_size=patch_size,
                        img_size=side * patch_size, registers=registers,
                        layerscale=layerscale, mlp_ratio=hidden / dim)
    return backbone, sized_from


def _head_from_state(state: dict, path: str) -> DINOHead:
    linear_ids = sorted(int(k.split(".")[1]) for k in state if re.match(r"mlp\.\d+\.weight$", k))
    if not linear_ids or "last_layer.weight_v" not in state:
        raise CheckpointError(f"{path}: DINO head lacks mlp.*.weight or last_layer.weight_v")
    first, last = state[f"mlp.{linear_ids[0]}.weight"], state[f"mlp.{linear_ids[-1]}.weight"]
    out_dim = state["last_layer.weight_v"].shape[0]
    return DINOHead(in_dim=first.shape[1], out_dim=out_dim, hidden_dim=first.shape[0],
                    bottleneck_dim=last.shape[0], nlayers=len(linear_ids))


def _pmm_from_state(state: dict, heads: int, attn_mul: float) -> PatchMatchingModule:
    depth = 1 + max(int(k.split(".")[1]) for k in state)
    dim = state["blocks.0.linear.weight"].shape[0]
    return PatchMatchingModule(dim, num_heads=heads, attn_mul=attn_mul, depth=depth)


def _load_strict(module: nn.Module, state: dict, path: str, what: str,
                 sized_from: str | None = None) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped keys in one clear error
    (`sized_from`: which of the file's tensors the module's sizes came from, told with
    mis-shaped keys)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k} file {tuple(state[k].shape)} != model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mis_shaped:
            problems.append(f"shape mismatches {mis_shaped}"
                            + (f" ({sized_from})" if sized_from else ""))
        raise CheckpointError(f"{path}: {what} does not match our model (our key names): "
                              + "; ".join(problems))
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- loading
def _read(path: str) -> tuple[dict, dict]:
    """Return (tensors, metadata) from a torch or safetensors file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if path.endswith(".safetensors") or not head.startswith(b"PK"):
        try:
            from safetensors import safe_open

            tensors, meta = {}, {}
            with safe_open(path, framework="pt", device="cpu") as handle:
                meta = dict(handle.metadata() or {})
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
            return {"__safetensors__": tensors}, meta
        except Exception as error:
            if path.endswith(".safetensors"):
                raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    if not head.startswith((b"PK", PICKLE_PROTOCOL_2_PLUS)):
        # Neither torch.save's zip nor its legacy pickle, and not safetensors (tried above).
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch.save file nor "
                              "safetensors); pass a `tcore train` checkpoint, a run's "
                              "teacher_backbone.safetensors or a reference checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "WeightsUnpickler error" not in str(error):
            # Not a refused object: the file itself is broken (a cut-short copy, say).
            raise CheckpointError(f"{path}: damaged or incomplete, torch cannot read it "
                                  f"({_first_sentence(error)}); copy or save it again") from error
        raise CheckpointError(f"{path}: cannot be read with tensors only "
                              f"({_unpickler_reason(error)}); tcore runs no code from a "
                              "checkpoint: save the state dict itself with torch.save") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    meta = checkpoint.get("tcore_meta", {}) if isinstance(checkpoint.get("tcore_meta"), dict) else {}
    if _is_tcore_training(checkpoint):
        # A `tcore train` checkpoint: sizes come from the run's own model config.
        model_cfg = checkpoint["config"]["model"]
        pmm_cfg = model_cfg.get("pmm") or {}
        arch = ARCHS.get(model_cfg.get("arch"))
        meta = {"num_heads": arch.num_heads if arch else None, "pmm_heads": pmm_cfg.get("heads"),
                "pmm_attn_mul": pmm_cfg.get("attn_mul")}
    elif isinstance(checkpoint.get("checkpoint"), dict) and isinstance(checkpoint.get("config"), dict):
        # The reference fixture bundle (official_tiny.pt): the checkpoint plus its sizes.
        config = checkpoint["config"]
        meta = {"num_heads": config.get("num_heads"), "pmm_heads": config.get("pmm_heads"),
                "pmm_attn_mul": config.get("pmm_attn_mul")}
        checkpoint = checkpoint["checkpoint"]
    return checkpoint, meta


PICKLE_PROTOCOL_2_PLUS = b"\x80"   # torch.save's legacy (non-zip) format starts so


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only refusal that says what it met (its advice to load
    with weights_only=False is left out: that would run the file's code)."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split(". ")[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _first_sentence(error: Exception) -> str:
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return line.split(". ")[0]


def _is_tcore_training(checkpoint: dict) -> bool:
    """Our own training checkpoints: a TCoRe state dict (timm key names) plus the run config."""
    config, model = checkpoint.get("config"), checkpoint.get("model")
    return (isinstance(config, dict) and isinstance(config.get("model"), dict)
            and isinstance(model, dict) and "teacher.backbone.reg_token" in model)


def _split_checkpoint(checkpoint: dict, path: str) -> tuple[str, dict, dict, dict]:
    """Return (kind, backbone, head, pmm) state dicts in the official sub-layout."""
    checkpoint = {key: _unwrapped(value) if key in STATE_SECTIONS and isinstance(value, dict)
                  else value for key, value in _unwrapped(checkpoint).items()}
    if "__safetensors__" in checkpoint:
        tensors = checkpoint["__safetensors__"]
        return ("safetensors", _strip(tensors, "backbone."), _strip(tensors, "head."),
                _strip(tensors, "pmm."))
    if isinstance(checkpoint.get("teacher"), dict):
        teacher = checkpoint["teacher"]
        auxiliary = checkpoint.get("auxiliary") or {}
        return ("eval", _strip(teacher, "backbone."), _strip(teacher, "dino_head."),
                _strip(auxiliary, "auxiliary_decoder."))
    if _is_tcore_training(checkpoint):
        model = checkpoint["model"]
        return ("tcore", _strip(model, "teacher.backbone."), _strip(model, "teacher.head."),
                _strip(model, "pmm."))
    if isinstance(checkpoint.get("model"), dict) and any(
            k.startswith("teacher.") for k in checkpoint["model"]):
        model = checkpoint["model"]
        return ("train", _strip(model, "teacher.backbone."), _strip(model, "teacher.dino_head."),
                _strip(model, "auxiliary.auxiliary_decoder."))
    for candidate in (checkpoint, checkpoint.get("state_dict"), checkpoint.get("model")):
        if isinstance(candidate, dict) and "patch_embed.proj.weight" in candidate:
            return "dinov2", dict(candidate), {}, {}
    raise CheckpointError(
        f"{path}: not a reference checkpoint: expected a 'teacher' dict (evaluation layout), a "
        f"'model' dict with 'teacher.*' keys (training layout) or a DINOv2 backbone state dict; "
        f"top-level keys are {sorted(checkpoint)[:20]}")


def load_reference(path, *, pmm_heads: int | None = None, pmm_attn_mul: float | None = None,
                   num_heads: int | None = None, attention: str = "auto",
                   backbone_only: bool = False) -> ReferenceModel:
    """Load a reference checkpoint (see module docstring) into our modules, eval mode on the CPU.

    Head counts are not stored in state dicts: the backbone's default to dim / 64 and the PMM's
    to 16 (the reference's), unless given here or recorded by :func:`export_reference`.
    `backbone_only`: head and PMM are neither read nor checked (`.head` and `.pmm` None), for
    evaluation, which uses the backbone alone.
    """
    path = os.fspath(path)
    checkpoint, meta = _read(path)
    kind, backbone_state, head_state, pmm_state = _split_checkpoint(checkpoint, path)
    if not backbone_state:
        raise CheckpointError(f"{path}: no backbone weights found ({kind} layout; keys there "
                              f"begin {_first_keys(checkpoint, kind)})")
    if backbone_only:
        head_state, pmm_state = {}, {}
    if kind not in ("safetensors", "tcore"):  # those two are already in our key layout
        backbone_state = backbone_from_official(backbone_state, path)
        pmm_state = pmm_from_official(pmm_state)
    unfold_cls_position(backbone_state)   # tcore's layout before 2026-11-27
    backbone, sized_from = _backbone_from_state(backbone_state, path,
                                                num_heads or _int(meta.get("num_heads")))
    _load_strict(backbone, backbone_state, path, "backbone", sized_from)
    head = None
    if head_state:
        head = _head_from_state(head_state, path)
        _load_strict(head, head_state, path, "DINO head")
    pmm = None
    if pmm_state:
        heads = pmm_heads or _int(meta.get("pmm_heads")) or DEFAULT_PMM_HEADS
        mul = pmm_attn_mul or _float(meta.get("pmm_attn_mul")) or DEFAULT_PMM_ATTN_MUL
        pmm = _pmm_from_state(pmm_state, heads, mul)
        _load_strict(pmm, pmm_state, path, "PMM")
    model = ReferenceModel(backbone, head, pmm, kind).eval()
    for module in (backbone, pmm):
        if module is not None:
            module.set_attention_backend(attention)
    return model


def _first_keys(checkpoint: dict, kind: str, count: int = 8) -> list[str]:
    """The first keys of the section where a layout looks for the backbone, as the file has
    them (to show what it holds instead)."""
    section = {"safetensors": "__safetensors__", "eval": "teacher", "train": "model",
               "tcore": "model"}.get(kind)
    keys = checkpoint.get(section, checkpoint) if section else checkpoint
    return sorted(map(str, keys))[:count]


def _int(value) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value) -> float | None:
    return float(value) if value not in (None, "") else None


# ----------------------------------------------------------------------------- export
def _meta(backbone: Backbone, pmm: PatchMatchingModule | None) -> dict:
    meta = {"num_heads": backbone.blocks[0].attn.num_heads}
    if pmm is not None:
        meta.update(pmm_heads=pmm.num_heads, pmm_attn_mul=float(pmm.attn_mul))
    return meta


def official_checkpoint(backbone: Backbone, head: DINOHead | None = None,
                        pmm: PatchMatchingModule | None = None) -> dict:
    """``{"teacher": {"backbone.*", "dino_head.*"}, "auxiliary": {"auxiliary_decoder.*"}}`` with
    the official key names and shapes (tensors stay where they are)."""
    teacher = {f"backbone.{k}": v for k, v in backbone_to_official(backbone.state_dict()).items()}
    if head is not None:
        teacher.update({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    checkpoint = {"teacher": teacher, "tcore_meta": _meta(backbone, pmm)}
    if pmm is not None:
        checkpoint["auxiliary"] = {f"auxiliary_decoder.{k}": v
                                   for k, v in pmm_to_official(pmm.state_dict()).items()}
    return checkpoint


def export_reference(backbone: Backbone, path, head: DINOHead | None = None,
                     pmm: PatchMatchingModule | None = None) -> None:
    """Write :func:`official_checkpoint` (on the CPU, plus a small ``tcore_meta`` dict with the
    head counts) atomically (temporary name, then rename)."""
    checkpoint = official_checkpoint(backbone, head, pmm)
    for section in ("teacher", "auxiliary"):
        if section in checkpoint:
            checkpoint[section] = {k: v.detach().cpu().clone() for k, v in checkpoint[section].items()}
    write_atomically(path, lambda temporary: save_torch(checkpoint, temporary))


def export_safetensors(backbone: Backbone, path, head: DINOHead | None = None,
                       pmm: PatchMatchingModule | None = None, durable: bool = False) -> None:
    """Write our own key layout (``backbone.*``, ``head.*``, ``pmm.*``) as safetensors, atomically
    (`durable`: flushed to disk before it replaces the old file, as checkpoints are)."""
    from safetensors.torch import save

    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    for prefix, module in (("head", head), ("pmm", pmm)):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous()
                            for k, v in module.state_dict().items()})
    metadata = {key: str(value) for key, value in _meta(backbone, pmm).items()}
    metadata["format"] = "tcore"
    # Serialised here and written by Python: safetensors' own file writer reports a full disk
    # as a SafetensorError, where Python's keeps the OSError that names the reason.
    payload = save(tensors, metadata=metadata)
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(payload),
                     durable=durable)


__all__ = ["load_reference", "export_reference", "export_safetensors", "ReferenceModel",
           "CheckpointError", "official_checkpoint", "backbone_from_official", "backbone_to_official",
           "pmm_from_official", "pmm_to_official"]
