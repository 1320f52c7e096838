"""AdamW with the reference's parameter groups (METHOD.md section 6).

Every trainable parameter gets three tags, the DINOv2 way:
- `lr_multiplier`: layer-wise decay `layer_decay ** (num_blocks + 1 - layer_id)` for the
  backbone (tokens, positional and patch embeddings are layer 0, block i is layer i + 1,
  the final norm and everything else is layer num_blocks + 1, like the head), times
  `patch_embed_lr_mult` for the patch embedding. Head and PMM: 1.0 (no layer decay).
- `wd_multiplier`: 0 for biases, normalisation layers and LayerScale gammas, else 1.
- `schedule`: which lr table drives it: "lr", "last_layer" (the head's last layer, lr 0
  during the first `freeze_last_layer_epochs`) or "pmm" (its own table at lr x pmm_lr_mult).
Parameters sharing all three tags are fused into one optimizer group.
At every step `apply_schedules` sets lr = table[it] * lr_multiplier and
weight_decay = wd_table[it] * wd_multiplier on each group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tcore.schedules import Schedules

# Backbone parameters that belong to the embedding "layer 0".
_EMBEDDING_PREFIXES = ("patch_embed", "pos_embed", "cls_token", "cls_pos_embed", "reg_token",
                       "register_tokens", "mask_token")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


@dataclass(frozen=True)
class ParamTag:
    name: str
    lr_multiplier: float
    wd_multiplier: float
    schedule: str  # "lr" | "last_layer" | "pmm"


def backbone_layer_id(name: str, num_blocks: int) -> int:
    """Layer id of a backbone parameter name (relative to the backbone module)."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay: biases, norm layers, LayerScale."""
    names = set()
    norm_modules = {prefix for prefix, m in module.named_modules() if isinstance(m, _NORM_TYPES)}
    for name, _ in module.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        leaf = name.rsplit(".", 1)[-1]
        # `in_proj_bias` (nn.MultiheadAttention) is a bias too.
        if (leaf == "bias" or leaf.endswith("_bias") or owner in norm_modules
                or "norm" in name or leaf == "gamma"):
            names.add(name)
    return names


def tag_parameters(backbone: nn.Module, head: nn.Module, pmm: nn.Module | None, *,
                   layer_decay: float, patch_embed_lr_mult: float
                   ) -> list[tuple[nn.Parameter, ParamTag]]:
    """Tag every trainable parameter of the student backbone, head and PMM."""
    num_blocks = len(backbone.blocks)
    tagged = []
    no_decay = _no_decay_names(backbone)
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layer_decay ** (num_blocks + 1 - backbone_layer_id(name, num_blocks))
        if name.startswith("patch_embed"):
            lr_mult *= patch_embed_lr_mult
        tagged.append((param, ParamTag(f"backbone.{name}", lr_mult,
                                       0.0 if name in no_decay else 1.0, "lr")))
    no_decay = _no_decay_names(head)
    for name, param in head.named_parameters():
        if not param.requires_grad:
            continue
        schedule = "last_layer" if name.startswith("last_layer") else "lr"
        tagged.append((param, ParamTag(f"head.{name}", 1.0,
                                       0.0 if name in no_decay else 1.0, schedule)))
    if pmm is not None:
        no_decay = _no_decay_names(pmm)
        for name, param in pmm.named_parameters():
            if not param.requires_grad:
                continue
            tagged.append((param, ParamTag(f"pmm.{name}", 1.0,
                                           0.0 if name in no_decay else 1.0, "pmm")))
    return tagged


def fuse_param_groups(tagged: list[tuple[nn.Parameter, ParamTag]]) -> list[dict]:
    """One optimizer group per (lr_multiplier, wd_multiplier, schedule) combination."""
    groups: dict[tuple, dict] = {}
    for param, tag in tagged:
        key = (round(tag.lr_multiplier, 12), tag.wd_multiplier, tag.schedule)
        group = groups.setdefault(key, {"params": [], "names": [],
                                        "lr_multiplier": tag.lr_multiplier,
                                        "wd_multiplier": tag.wd_multiplier,
                                        "schedule": tag.schedule,
                                        "is_last_layer": tag.schedule == "last_layer"})
        group["params"].append(param)
        group["names"].append(tag.name)
    return list(groups.values())


class ListedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (`fused=True`), stepped with less Python. torch rebuilds every
    group's parameter, gradient and state lists at each step, one parameter at a time;
    after the backward the GPU waits for that host work. Here the lists are kept between
    steps (rebuilt when a group's parameters or states are new objects, as after
    `load_state_dict`), the step counters of all groups are advanced in one call and
    `torch._fused_adamw_` is called directly: the kernels and arguments of torch's fused
    path, so the same numbers (tested against `torch.optim.AdamW(fused=True)`). A gradient
    scaler whose `unscale_` ran first (the fp16 step: clipping needs unscaled gradients)
    hands over only `found_inf`, which the kernels take on the device as torch's path does:
    a step with an inf or NaN gradient changes nothing, with no host sync. Anything else
    (the first step, which creates the states; a closure; a scaler's `grad_scale`; a
    missing gradient; amsgrad, maximize, capturable, mixed devices or dtypes in a group)
    takes torch's own step."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._listed: dict[int, tuple] = {}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._listed.clear()

    def __setstate__(self, state) -> None:      # unpickled or deep-copied: nothing listed
        super().__setstate__(state)
        self._listed = {}

    def step(self, closure=None):
        # Set by torch.amp.GradScaler.step for optimizers that take the scaling themselves.
        found_inf = getattr(self, "found_inf", None)
        plans = None
        if closure is None and getattr(self, "grad_scale", None) is None:
            plans = [self._plan(index, group, found_inf)
                     for index, group in enumerate(self.param_groups)]
        if plans is None or any(plan is None for plan in plans):
            return _torch_adamw_step(self, closure)
        self._fused_step(plans, found_inf)
        return None

    @torch.no_grad()
    def _fused_step(self, plans: list, found_inf: torch.Tensor | None) -> None:
        steps = [step for plan in plans for step in plan[4]]
        if steps:
            torch._foreach_add_(steps, 1)
        for group, (params, grads, exp_avgs, exp_avg_sqs, group_steps) in zip(
                self.param_groups, plans):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], group_steps,
                                amsgrad=False, lr=group["lr"], beta1=float(beta1),
                                beta2=float(beta2), weight_decay=group["weight_decay"],
                                eps=group["eps"], maximize=False, grad_scale=None,
                                found_inf=found_inf)
        if found_inf is not None and steps:
            # A skipped step does not count (torch's fused path takes it back the same way).
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _plan(self, index: int, group: dict, found_inf: torch.Tensor | None = None):
        """(params, grads, exp_avgs, exp_avg_sqs, steps) of a group, or None where torch's
        step must serve."""
        if (not group["fused"] or group["amsgrad"] or group["maximize"]
                or group["capturable"] or group["differentiable"]
                or not group.get("decoupled_weight_decay", True)
                or torch.is_tensor(group["lr"])):
            return None
        params = group["params"]
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return None
        if found_inf is not None and params and found_inf.device != params[0].device:
            return None       # torch's path moves it to each group's device
        listed = self._listed.get(index)
        if not self._still_valid(listed, params):
            listed = self._list_states(params)
            if listed is None:
                return None
            self._listed[index] = listed
        return (listed[0], grads, *listed[1:])

    def _still_valid(self, listed, params) -> bool:
        """The same parameters and states as listed (checked at both ends of the group)."""
        if listed is None or len(listed[0]) != len(params):
            return False
        for end in (0, -1) if params else ():
            state = self.state.get(params[end])
            if (listed[0][end] is not params[end] or state is None
                    or state.get("exp_avg") is not listed[1][end]):
                return False
        return True

    def _list_states(self, params):
        states = [self.state.get(p) for p in params]
        if any(not s or "exp_avg" not in s for s in states):
            return None                                   # the first step makes them
        if len({(p.device, p.dtype, type(p)) for p in params}) > 1:
            return None           # torch's fused path groups by device and dtype first
        return (list(params), [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["step"] for s in states])


def _torch_adamw_step(optimizer: torch.optim.AdamW, closure=None):
    """torch's AdamW.step itself, without the profiling / hook wrapper torch puts around a
    class's `step` (ours already has it)."""
    step = torch.optim.AdamW.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step(optimizer, closure)


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(student backbone, student head, PMM) of a `tcore.ssl.TCoRe`."""
    return model.student["backbone"], model.student["head"], getattr(model, "pmm", None)


def build_optimizer(model: nn.Module, optim_cfg, device: torch.device | str = "cpu"
                    ) -> torch.optim.AdamW:
    """AdamW (betas from config) over the tagged groups; on CUDA fused kernels, stepped by
    `ListedAdamW`."""
    backbone, head, pmm = model_parts(model)
    tagged = tag_parameters(backbone, head, pmm, layer_decay=float(optim_cfg.layer_decay),
                            patch_embed_lr_mult=float(optim_cfg.patch_embed_lr_mult))
    groups = fuse_param_groups(tagged)
    betas = (float(optim_cfg.adamw_beta1), float(optim_cfg.adamw_beta2))
    if torch.device(device).type == "cuda":
        return ListedAdamW(groups, lr=0.0, weight_decay=0.0, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=betas)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, it: int) -> dict:
    """Set every group's lr and weight decay for iteration `it`; return the values."""
    values = schedules.at(it)
    base_lr = {"lr": values["lr"], "last_layer": values["last_layer_lr"],
               "pmm": values["pmm_lr"]}
    for group in optimizer.param_groups:
        group["lr"] = base_lr[group["schedule"]] * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]
    return values
