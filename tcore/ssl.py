"""The T-CoRe model and its training step (METHOD.md section 5).

``TCoRe`` holds the student (backbone + DINO head), the EMA teacher, the Patch Matching Module
and the two teacher centers. ``forward_losses`` computes every loss term of one step without
host synchronisation: masked tokens are gathered with ``mask_indices`` (``index_select``), the
number of masked tokens comes from that tensor's shape, and the centers are updated in place.
The optimizer step, gradient scaling and schedules live in the train loop (``tcore.optim``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tcore import losses
from tcore.models import DINOHead, PatchMatchingModule, build_backbone
from tcore.models.attention import BACKENDS
from tcore.models.vit import ARCHS

# Parameter and module registrations anywhere in the process, so `TCoRe._listed` knows
# when a parameter list it keeps may be stale (a replaced head, a new parameter).
_REGISTRATIONS = [0]


def _count_registration(*_args) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def default_model_config() -> dict:
    """The reference's network configuration (ViT-S/16)."""
    return {
        "arch": "vit_small", "patch_size": 16, "drop_path": 0.1, "registers": 4,
        "layerscale": 1e-5, "attention": "auto", "img_size": 224,
        "head": {"prototypes": 65536, "hidden": 2048, "bottleneck": 256, "layers": 3},
        "pmm": {"heads": 16, "attn_mul": 4.0, "depth": 1},
    }


def default_loss_config() -> dict:
    """The reference's loss configuration (weights as METHOD.md section 5)."""
    return {
        "student_temp": 0.1, "center_momentum": 0.9,
        "dino_weight": 1.0, "dino_global_weight": 2.0,  # global CE pair counts twice (loss_scales)
        "koleo_weight": 0.1, "patch_weight": 0.8, "past_future_weight": 20.0,
    }


def merge_over_defaults(defaults: dict, overrides, where: str) -> dict:
    """Deep-merge a mapping (dict or OmegaConf DictConfig) into defaults; unknown keys fail."""
    if overrides is None:
        return defaults
    if not isinstance(overrides, Mapping):
        try:
            from omegaconf import OmegaConf

            overrides = OmegaConf.to_container(overrides, resolve=True)
        except Exception as error:
            raise TypeError(f"{where}: expected a mapping, got {type(overrides).__name__}") from error
    merged = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"unknown key {where}.{key} (known there: "
                             f"{', '.join(sorted(defaults))})")
        if isinstance(defaults[key], dict):
            merged[key] = merge_over_defaults(defaults[key], value, f"{where}.{key}")
        else:
            _check_value(f"{where}.{key}", defaults[key], value)
            merged[key] = value
    return merged


# Settings with a fixed set of values; the others take the kind of value their default has.
_CHOICES = {"model.arch": sorted(ARCHS), "model.attention": list(BACKENDS)}


def _check_value(name: str, default, value) -> None:
    """A value of the default's kind (an integer also for a float), or one of the choices."""
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        return
    if isinstance(default, bool):
        kind, fits = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        kind, fits = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        kind, fits = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        kind, fits = "a string", isinstance(value, str)
    else:
        return
    if not fits:
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _ranged(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def check_model_values(cfg: dict) -> None:
    """Ranges of a merged model config (kinds are checked as it merges): a value out of range
    is named here rather than failing inside the network at its first step (a zero-width
    head dies of a floating point exception, a drop-path rate above 1 in `bernoulli_`)."""
    _ranged("model.patch_size", cfg["patch_size"], cfg["patch_size"] > 0, "must be an integer > 0")
    _ranged("model.drop_path", cfg["drop_path"], 0 <= cfg["drop_path"] < 1, "must lie in [0, 1)")
    _ranged("model.registers", cfg["registers"], cfg["registers"] >= 0, "must be >= 0")
    _ranged("model.layerscale", cfg["layerscale"], cfg["layerscale"] >= 0,
            "must be >= 0 (0: no layer scale)")
    _ranged("model.img_size", cfg["img_size"], cfg["img_size"] >= cfg["patch_size"] > 0,
            f"must be at least model.patch_size ({cfg['patch_size']})")
    for key in ("prototypes", "hidden", "bottleneck", "layers"):
        _ranged(f"model.head.{key}", cfg["head"][key], cfg["head"][key] >= 1, "must be >= 1")
    pmm = cfg["pmm"]
    _ranged("model.pmm.depth", pmm["depth"], pmm["depth"] >= 1, "must be >= 1")
    _ranged("model.pmm.attn_mul", pmm["attn_mul"], pmm["attn_mul"] > 0, "must be > 0")
    width = ARCHS[cfg["arch"]].embed_dim
    _ranged("model.pmm.heads", pmm["heads"], pmm["heads"] >= 1 and width % pmm["heads"] == 0,
            f"must divide model.arch {cfg['arch']}'s width {width}")


def check_loss_values(cfg: dict) -> None:
    """Ranges of a merged loss config."""
    _ranged("loss.student_temp", cfg["student_temp"], cfg["student_temp"] > 0, "must be > 0")
    _ranged("loss.center_momentum", cfg["center_momentum"], 0 <= cfg["center_momentum"] <= 1,
            "must lie in [0, 1]")
    for key in ("dino_weight", "dino_global_weight", "koleo_weight", "patch_weight",
                "past_future_weight"):
        _ranged(f"loss.{key}", cfg[key], cfg[key] >= 0, "must be >= 0")


def backbone_from_config(cfg: dict, drop_path: float):
    """The backbone a merged model config (``TCoRe.model_cfg``) describes."""
    return build_backbone(cfg["arch"], patch_size=cfg["patch_size"], drop_path=drop_path,
                          registers=cfg["registers"], layerscale=cfg["layerscale"],
                          attention=cfg["attention"], img_size=cfg["img_size"])


def _build_student_like(cfg: dict, drop_path: float) -> nn.ModuleDict:
    backbone = backbone_from_config(cfg, drop_path)
    head_cfg = cfg["head"]
    head = DINOHead(backbone.embed_dim, out_dim=head_cfg["prototypes"], hidden_dim=head_cfg["hidden"],
                    bottleneck_dim=head_cfg["bottleneck"], nlayers=head_cfg["layers"])
    return nn.ModuleDict({"backbone": backbone, "head": head})


class TCoRe(nn.Module):
    """Student, EMA teacher, PMM and centers; ``forward_losses`` is one T-CoRe step's losses.

    Loss terms returned by ``forward_losses`` (0-dim float32 tensors, already weighted, so
    ``total`` is their sum):
    - ``dino``: L_DINO, [CE(local, both teacher crops) + 2 CE(global, swapped teacher)] / 18;
    - ``koleo``: 0.1 * sum over the 2 global crops of KoLeo(student cls tokens);
    - ``patch_past`` / ``patch_future``: L_pt / L_ft, 0.8 * masked-token CE between
      head(PMM(past or future, student tokens)) and the teacher's centred patch probabilities;
    - ``past_future``: L_pf, 20 * MSE(head(PMM_past), head(PMM_future)) at masked tokens;
    - ``total``.
    """

    def __init__(self, model_cfg=None, loss_cfg=None) -> None:
        super().__init__()
        self.model_cfg = merge_over_defaults(default_model_config(), model_cfg, "model")
        self.loss_cfg = merge_over_defaults(default_loss_config(), loss_cfg, "loss")
        check_model_values(self.model_cfg)
        check_loss_values(self.loss_cfg)
        self.student = _build_student_like(self.model_cfg, drop_path=self.model_cfg["drop_path"])
        # The teacher never drops paths (DINOv2 builds it without stochastic depth).
        self.teacher = _build_student_like(self.model_cfg, drop_path=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        embed_dim = self.student["backbone"].embed_dim
        pmm_cfg = self.model_cfg["pmm"]
        self.pmm = PatchMatchingModule(embed_dim, num_heads=pmm_cfg["heads"], attn_mul=pmm_cfg["attn_mul"],
                                       depth=pmm_cfg["depth"], attention=self.model_cfg["attention"])
        prototypes = self.model_cfg["head"]["prototypes"]
        self.register_buffer("center_cls", torch.zeros(1, prototypes))
        self.register_buffer("center_patch", torch.zeros(1, prototypes))
        self._check_ema_pairs()
        self._parameter_lists: dict[str, list] = {}   # see _listed
        self.teacher.eval()   # from the start: training never calls .train() itself

    # ------------------------------------------------------------------ modes and accessors
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is a target network: always inference behaviour
        return self

    def teacher_backbone(self):
        return self.teacher["backbone"]

    def _check_ema_pairs(self) -> None:
        student = [name for name, _ in self.student.named_parameters()]
        teacher = [name for name, _ in self.teacher.named_parameters()]
        if student != teacher:
            raise RuntimeError("student and teacher parameters do not pair up for the EMA")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, teacher_temp: float):
        """Centred teacher probabilities: cls [2B, K] in crop order, masked patches [M, K]."""
        tokens = self.teacher["backbone"].forward_features(global_crops)
        n_crops, n_masked = global_crops.shape[0], mask_indices.shape[0]
        patch = tokens["patch"].flatten(0, 1).index_select(0, mask_indices)
        # One head call on [cls; masked patches]: the head is shared.
        logits = self.teacher["head"](torch.cat([tokens["cls"], patch]))
        cls_logits, patch_logits = logits.split([n_crops, n_masked])
        cls_probs = losses.softmax_centered(cls_logits, self.center_cls, teacher_temp)
        patch_probs = losses.softmax_centered(patch_logits, self.center_patch, teacher_temp)
        losses.update_center(self.center_cls, cls_logits, self.loss_cfg["center_momentum"])
        if n_masked:
            losses.update_center(self.center_patch, patch_logits, self.loss_cfg["center_momentum"])
        return cls_probs, patch_probs

    @torch.no_grad()
    def _memory_tokens(self, past_crops: torch.Tensor, future_crops: torch.Tensor) -> torch.Tensor:
        """Student backbone (no gradients) patch tokens of [past; future] crops, [4B, N, D]."""
        return self.student["backbone"].forward_features(torch.cat([past_crops, future_crops]))["patch"]

    def _student_tokens(self, global_crops, masks, local_crops):
        """Student cls/patch tokens of the masked global crops and cls tokens of the local crops.

        Two backbone calls: at the paper's batch both are large enough to fill the GPU, so a
        fused multi-resolution forward would buy little (docs/PERFORMANCE.md, the summary).
        """
        backbone = self.student["backbone"]
        global_tokens = backbone.forward_features(global_crops, masks)
        if local_crops is not None and local_crops.shape[0]:
            local_cls = backbone.forward_features(local_crops)["cls"]
        else:
            local_cls = global_tokens["cls"][:0]
        return global_tokens, local_cls

    def forward_losses(self, batch: Mapping, teacher_temp: float) -> dict:
        """Every loss term of one step for a batch in the docs/ARCHITECTURE.md contract."""
        cfg = self.loss_cfg
        global_crops, masks = batch["global_crops"], batch["masks"]
        mask_indices, mask_weights = batch["mask_indices"], batch["mask_weights"]
        n_crops, n_masked = global_crops.shape[0], mask_indices.shape[0]

        teacher_cls, teacher_patch = self._teacher_targets(global_crops, mask_indices, teacher_temp)
        memory = self._memory_tokens(batch["past_crops"], batch["future_crops"])
        global_tokens, local_cls = self._student_tokens(global_crops, masks, batch.get("local_crops"))

        query = global_tokens["patch"]
        matched = self.pmm(memory, torch.cat([query, query]))  # [past; future] x same query
        dim = matched.shape[-1]
        matched = matched.reshape(2, -1, dim).index_select(1, mask_indices)  # [2, M, D]
        logits = self.student["head"](torch.cat([global_tokens["cls"], local_cls, matched.flatten(0, 1)]))
        global_logits, local_logits, past_logits, future_logits = logits.split(
            [n_crops, local_cls.shape[0], n_masked, n_masked])

        student_temp = cfg["student_temp"]
        terms = {
            "dino": cfg["dino_weight"] * losses.dino_loss(
                global_logits, local_logits, teacher_cls, student_temp, cfg["dino_global_weight"]),
            "koleo": cfg["koleo_weight"] * losses.koleo_loss(global_tokens["cls"]),
            "patch_past": cfg["patch_weight"] * losses.masked_patch_loss(
                past_logits, teacher_patch, mask_weights, n_crops, student_temp),
            "patch_future": cfg["patch_weight"] * losses.masked_patch_loss(
                future_logits, teacher_patch, mask_weights, n_crops, student_temp),
            "past_future": cfg["past_future_weight"] * losses.past_future_loss(past_logits, future_logits),
        }
        terms["total"] = sum(terms.values())
        return terms

    # ------------------------------------------------------------------ after backward
    @torch.no_grad()
    def clip_gradients(self, max_norm: float = 3.0) -> dict:
        """Clip each module's gradient norm separately; returns the pre-clip norms (tensors).

        The arithmetic of `torch.nn.utils.clip_grad_norm_` per module (the same norms, bit
        for bit), but one `_foreach_norm` over every gradient instead of one per module:
        after the backward the GPU waits for the host's launches, and three clip calls were
        three rounds of Python grouping and launches.
        """
        modules = (("backbone", self.student["backbone"]), ("head", self.student["head"]),
                   ("pmm", self.pmm))
        grads = [[p.grad for p in self._listed(name, module) if p.grad is not None]
                 for name, module in modules]
        flat = [g for part in grads for g in part]
        if len({(type(g), g.device, g.dtype) for g in flat}) > 1:
            # One list of norms assumes one kind of gradient (torch's groups them by device
            # and dtype; DTensors and tensors do not mix in one foreach call): never so in
            # this trainer, but then torch's own per-module clip is the exact definition.
            return {name: torch.nn.utils.clip_grad_norm_(
                        [p for p in module.parameters() if p.grad is not None], max_norm,
                        foreach=True)
                    for (name, module), part in zip(modules, grads) if part}
        per_tensor = iter(torch._foreach_norm(flat, 2.0))
        norms = {}
        for (name, _), part in zip(modules, grads):
            if not part:
                continue
            total = torch.linalg.vector_norm(torch.stack([next(per_tensor) for _ in part]), 2.0)
            torch._foreach_mul_(part, torch.clamp(max_norm / (total + 1e-6), max=1.0))
            norms[name] = total
        return norms

    def _listed(self, key: str, module: nn.Module) -> list:
        """`module`'s parameters, listed once and reused while they are the same objects:
        walking the modules at every step took the host longer than the clip's and the
        EMA's launches. Listed again after any parameter or module registration in the
        process (torch's registration hooks count them) or when the first parameter is a
        new object (FSDP2's sharding writes them in place of the old ones, hooks unseen)."""
        first = next(module.parameters(), None)
        listed = self._parameter_lists.get(key)
        if (listed is None or listed[0] != _REGISTRATIONS[0]
                or (listed[1][0] if listed[1] else None) is not first):
            listed = self._parameter_lists[key] = (_REGISTRATIONS[0], list(module.parameters()))
        return listed[1]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (backbone and head)."""
        teacher = self._listed("teacher", self.teacher)
        student = self._listed("student", self.student)
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


__all__ = ["TCoRe", "backbone_from_config", "default_model_config", "default_loss_config"]
