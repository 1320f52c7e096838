"""Per-iteration schedules (METHOD.md section 6): lr, PMM lr, last-layer lr, weight decay,
teacher momentum and teacher temperature.

Every schedule is a precomputed float64 table indexed by the global iteration, built the
DINOv2 way: `freeze` iterations at 0, then a linear warm-up of `warmup` iterations from
`start` that *ends on* `base` (numpy linspace with its end point), then a half cosine from
`base` to `final` over the remaining iterations. Past the end the value stays at `final`.
Tables keep the configured length even when a run stops early (`--max-steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class CosineSchedule:
    """A warm-up + cosine table; `schedule[it]` is the value at iteration `it`."""

    def __init__(self, base: float, final: float, total_iters: int, warmup_iters: int = 0,
                 start: float = 0.0, freeze_iters: int = 0):
        if total_iters <= 0:
            raise ValueError(f"schedule needs total_iters > 0, got {total_iters}")
        if warmup_iters < 0 or freeze_iters < 0 or warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"schedule warm-up ({warmup_iters}) + freeze ({freeze_iters}) iterations must be "
                f">= 0 and fit in total_iters ({total_iters})")
        self.base, self.final, self.total_iters = float(base), float(final), int(total_iters)
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start, base, warmup_iters)
        n_cos = total_iters - warmup_iters - freeze_iters
        steps = np.arange(n_cos)
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(n_cos, 1)))
        self.values = np.concatenate([freeze, warmup, cosine])

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"negative iteration {it}")
        if it >= self.total_iters:
            return self.final
        return float(self.values[it])

    def __len__(self) -> int:
        return self.total_iters


def scaled_base_lr(base_lr: float, global_batch: int, reference_batch: int = 1024) -> float:
    """sqrt batch scaling of the base lr: base_lr * sqrt(global_batch / 1024)."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be > 0, got {global_batch}")
    return base_lr * math.sqrt(global_batch / reference_batch)


@dataclass
class Schedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    pmm_lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    epoch_length: int
    total_iters: int

    def at(self, it: int) -> dict[str, float]:
        """All schedule values at iteration `it` (what the step and the logs use)."""
        return {"lr": self.lr[it], "last_layer_lr": self.last_layer_lr[it],
                "pmm_lr": self.pmm_lr[it], "weight_decay": self.weight_decay[it],
                "momentum": self.momentum[it], "teacher_temp": self.teacher_temp[it]}


def schedule_length(optim_cfg) -> int:
    """The schedules' length in steps: optim.epochs "epochs" of official_epoch_length."""
    return int(optim_cfg.epochs) * int(optim_cfg.official_epoch_length)


def build_schedules(optim_cfg, global_batch: int) -> Schedules:
    """All schedules of METHOD.md section 6 from the config's `optim` section.

    Keys used: base_lr, min_lr, epochs, warmup_epochs, official_epoch_length,
    weight_decay, weight_decay_end, momentum_teacher, final_momentum_teacher,
    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, pmm_lr_mult,
    freeze_last_layer_epochs, scaling_rule ("sqrt_wrt_1024" or "none").
    """
    epoch = int(optim_cfg.official_epoch_length)
    total = schedule_length(optim_cfg)
    warmup = int(optim_cfg.warmup_epochs) * epoch
    if optim_cfg.scaling_rule == "sqrt_wrt_1024":
        lr = scaled_base_lr(optim_cfg.base_lr, global_batch)
    elif optim_cfg.scaling_rule == "none":
        lr = float(optim_cfg.base_lr)
    else:
        raise ValueError(f"optim.scaling_rule must be 'sqrt_wrt_1024' or 'none', "
                         f"got {optim_cfg.scaling_rule!r}")
    min_lr = float(optim_cfg.min_lr)
    lr_schedule = CosineSchedule(lr, min_lr, total, warmup, start=0.0)
    # The last layer follows the lr schedule but is held at 0 for the first epochs.
    freeze = int(optim_cfg.freeze_last_layer_epochs) * epoch
    last_layer = CosineSchedule(lr, min_lr, total, warmup, start=0.0)
    last_layer.values[:freeze] = 0.0
    # The PMM has its own schedule: warm-up to lr * pmm_lr_mult, then cosine to min_lr.
    pmm = CosineSchedule(lr * float(optim_cfg.pmm_lr_mult), min_lr, total, warmup, start=0.0)
    wd = CosineSchedule(optim_cfg.weight_decay, optim_cfg.weight_decay_end, total)
    momentum = CosineSchedule(optim_cfg.momentum_teacher, optim_cfg.final_momentum_teacher, total)
    temp_warmup = int(optim_cfg.warmup_teacher_temp_epochs) * epoch
    # Teacher temperature: linear ramp then constant (a "cosine" from base to base).
    teacher_temp = CosineSchedule(optim_cfg.teacher_temp, optim_cfg.teacher_temp,
                                  max(total, temp_warmup), temp_warmup,
                                  start=optim_cfg.warmup_teacher_temp)
    return Schedules(lr=lr_schedule, last_layer_lr=last_layer, pmm_lr=pmm, weight_decay=wd,
                     momentum=momentum, teacher_temp=teacher_temp, epoch_length=epoch,
                     total_iters=total)
