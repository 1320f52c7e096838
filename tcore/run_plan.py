"""What a `tcore train` run is about to do, in a few lines: the network and how it runs, the
data and the global batch, how many steps and passes over the data that makes, and the
schedules' numbers after batch scaling. Printed when a run starts and by `tcore train
--dry-run`, which stops there, so that a week-long job's arithmetic can be read first."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from tcore.schedules import build_schedules

AUTO_PRECISION = "auto (bf16 on a GPU that has it, else fp16; fp32 on the CPU)"
KIND_NAMES = {"video": "video", "frames": "video (JPEG-frame)", "image": "image"}


@dataclass(frozen=True)
class RunSetting:
    """How the run executes, which the config alone does not say."""
    world_size: int
    parallel: str           # "single", "ddp" or "fsdp"
    precision: str          # resolved, or AUTO_PRECISION where no device is at hand
    device: str


def plan_lines(cfg: DictConfig, shard_set, setting: RunSetting, start_step: int = 0,
               end_step: int | None = None) -> list[str]:
    """The plan as `name  text` lines (no trailing newlines); a `this run` line where the
    run trains part of the schedule (a resume, --max-steps): steps start_step+1..end_step."""
    batch = int(cfg.data.batch_size_per_gpu)
    global_batch = batch * setting.world_size
    schedules = build_schedules(cfg.optim, global_batch)
    total, epoch = schedules.total_iters, schedules.epoch_length
    samples = shard_set.total_samples
    return [
        f"model     {_model(cfg)}, {setting.precision} on {setting.device}, "
        f"{_processes(setting)}",
        f"data      {samples:,} {KIND_NAMES.get(shard_set.kind, shard_set.kind)} samples in "
        f"{_shards(len(shard_set.tars))}; "
        f"{batch} per process x {setting.world_size} = global batch {global_batch:,}",
        f"steps     {int(cfg.optim.epochs):,} epochs x {epoch:,} steps = {total:,} steps "
        f"= {total * global_batch:,} samples drawn, {_passes(total * global_batch / samples)} "
        f"over the data",
        f"lr        {_lr(cfg.optim, global_batch, schedules)}",
        f"schedules weight decay {_number(cfg.optim.weight_decay)} -> "
        f"{_number(cfg.optim.weight_decay_end)}; teacher momentum "
        f"{_number(cfg.optim.momentum_teacher)} -> {_number(cfg.optim.final_momentum_teacher)}; "
        f"teacher temperature {_teacher_temperature(cfg.optim, schedules)}",
        *_this_run(start_step, end_step, total, global_batch, samples, schedules),
    ]


def stop_note(max_steps: int | None, total_steps: int) -> str:
    """Where a run given --max-steps stops: there, or where its schedule ends before it."""
    if not max_steps:
        return ""
    if max_steps > total_steps:
        return (f", stopping at step {total_steps:,}, where the schedule ends (before "
                f"--max-steps {max_steps:,})")
    return f", stopping at --max-steps {max_steps:,}"


def _shards(count: int) -> str:
    return "1 shard" if count == 1 else f"{count:,} shards"


def _passes(passes: float) -> str:
    return f"{passes:,.1f} passes" if passes < 100 else f"{passes:,.0f} passes"


def _model(cfg: DictConfig) -> str:
    compiled = f", compiled ({cfg.train.compile_backend})" if cfg.train.compile else ""
    return f"{cfg.model.arch}{compiled}"


def _processes(setting: RunSetting) -> str:
    if setting.world_size == 1:
        return "1 process"
    return f"{setting.world_size} processes ({setting.parallel.upper()})"


def _lr(optim: DictConfig, global_batch: int, schedules) -> str:
    peak = schedules.lr.base
    if optim.scaling_rule == "sqrt_wrt_1024":
        scaled = f"{_number(optim.base_lr)} x sqrt({global_batch:,} / 1024) = {_number(peak)}"
    else:
        scaled = _number(peak)
    warmup = int(optim.warmup_epochs) * schedules.epoch_length
    pmm = _number(peak * float(optim.pmm_lr_mult))
    return (f"{scaled}, reached after {warmup:,} warm-up steps, then cosine to "
            f"{_number(optim.min_lr)} (PMM: {pmm}{_multipliers(optim)})")


def _this_run(start_step: int, end_step: int | None, total: int, global_batch: int,
              samples: int, schedules) -> list[str]:
    end = total if end_step is None else min(end_step, total)
    if (start_step, end) == (0, total) or end <= start_step:
        return []
    drawn = (end - start_step) * global_batch
    return [f"this run  steps {start_step + 1:,}..{end:,} of {total:,}: {drawn:,} samples drawn, "
            f"{_passes(drawn / samples)} over the data; lr {_number(schedules.lr[end - 1])} "
            f"at its last step"]


def _teacher_temperature(optim: DictConfig, schedules) -> str:
    """Its warm-up, and where it ends when the warm-up outlasts the run."""
    warmup = int(optim.warmup_teacher_temp_epochs) * schedules.epoch_length
    text = (f"{_number(optim.warmup_teacher_temp)} -> {_number(optim.teacher_temp)} over "
            f"{warmup:,} steps")
    total = schedules.total_iters
    if warmup > total:
        text += (f", longer than the run: it ends at "
                 f"{_number(schedules.teacher_temp[total - 1])}")
    return text


def _multipliers(optim: DictConfig) -> str:
    """The per-group lr factors beyond the PMM's, where set (the presets set none)."""
    parts = []
    if float(optim.layer_decay) != 1.0:
        parts.append(f"layer decay {_number(optim.layer_decay)}")
    if float(optim.patch_embed_lr_mult) != 1.0:
        parts.append(f"patch embedding x{_number(optim.patch_embed_lr_mult)}")
    if int(optim.freeze_last_layer_epochs):
        parts.append(f"last layer frozen {int(optim.freeze_last_layer_epochs)} epoch(s)")
    return "; " + ", ".join(parts) if parts else ""


def _number(value) -> str:
    return f"{float(value):.4g}"
