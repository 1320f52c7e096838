"""`tcore train`: the T-CoRe training loop (METHOD.md sections 5 and 6).

One process per GPU (torchrun; DDP, or FSDP through tcore.fsdp), the CPU run being world
size 1. Per step:
schedules -> forward_losses (autocast) -> backward (gradient scaler for fp16) -> per-module
clipping -> AdamW -> teacher EMA. Losses stay on the device; the host reads them back only
at log and checkpoint steps, where a NaN/inf stops the run before anything is saved.

A run directory holds `config.yaml` (the resolved config), `checkpoints/checkpoint-*.pt`,
`metrics.jsonl`, `tensorboard/` and `teacher_backbone.safetensors`. `resume=True` restores
model, optimizer, scaler, step, RNG and data iterator state from the newest checkpoint, so a
run stopped at any point (kill -9 included) continues with the same losses, step for step.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tcore.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                              load_checkpoint, remove_stale_temporaries, rng_state,
                              save_checkpoint, set_rng_state)
from tcore.config import ConfigError, save_config, validate_config
from tcore.distributed import DistInfo, all_reduce_mean_, barrier, init_distributed, shutdown
from tcore.metrics_log import LossHistory, MetricsLogger, NonFiniteLossError, truncate_metrics
from tcore.optim import apply_schedules, build_optimizer
from tcore.preprocess.files import (OutputWriteError, check_output_path, make_output_directory,
                                   temporary_prefix)
from tcore.preprocess.locks import exclusive_lock
from tcore.preprocess.manifest import missing_manifest_hint
from tcore.run_plan import AUTO_PRECISION, RunSetting, plan_lines, stop_note
from tcore.schedules import build_schedules, schedule_length
from tcore.step_stream import step_stream
from tcore.stop_request import StopRequest

TEACHER_EXPORT = "teacher_backbone.safetensors"
CONFIG_FILE = "config.yaml"
RUN_LOCK = ".lock"
# What a run directory holds besides its lock and temporaries (whose names start with a dot).
RUN_ENTRIES = frozenset({CONFIG_FILE, TEACHER_EXPORT, "checkpoints", "metrics.jsonl",
                         "tensorboard"})
# Sections that must not change between a run and its resumption, and single keys of the
# others (the seed draws the loader's order and every rank's random numbers).
RESUME_LOCKED_SECTIONS = ("model", "loss", "data", "optim")
RESUME_LOCKED_KEYS = ("train.seed",)
# Keys of those sections that change how fast the loader makes its batches, never which
# batches (each is tested to give the same ones either way): a resumed run may set them
# anew, e.g. on a machine with other cores, or to try `assemble_ahead`.
RESUME_FREE_KEYS = frozenset({"data.num_threads", "data.pipeline.prefetch",
                              "data.pipeline.cpu_lanes", "data.pipeline.producer",
                              "data.pipeline.assemble_ahead"})


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    end_step: int
    last_checkpoint: Path | None
    teacher_export: Path | None
    metrics: Path
    is_main: bool = True  # rank 0 (the process that writes files and prints)
    stopped_by: str | None = None  # the signal that ended the run early (tcore.stop_request)


class LossModule(nn.Module):
    """`forward(batch, teacher_temp)` = TCoRe.forward_losses, so DDP and torch.compile can
    wrap the whole loss computation like any module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, teacher_temp: torch.Tensor) -> dict:
        return self.model.forward_losses(batch, teacher_temp)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if requested != "auto":
        if device.type == "cpu" and requested == "fp16":
            raise ConfigError("train.precision=fp16 (the paper presets' precision) needs a "
                              "GPU: on the CPU add train.precision=fp32 (or bf16)")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_manifests(data: str | os.PathLike | list) -> list[Path]:
    """Shard directories or manifest.json paths (a list, or one comma-separated string)."""
    items = [part for item in (data if isinstance(data, (list, tuple)) else [data])
             for part in str(item).split(",") if part.strip()]
    manifests = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"--data {item}: no such file or directory")
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            hint = missing_manifest_hint(path.parent) or \
                " (build shards with `tcore shards build` first)"
            raise FileNotFoundError(f"--data {item}: no manifest.json there{hint}")
        manifests.append(path)
    if not manifests:
        raise FileNotFoundError("--data: no shard directory given")
    return manifests


def build_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    from tcore import ssl
    try:  # TCoRe merges over its defaults and rejects unknown keys
        model = ssl.TCoRe(OmegaConf.to_container(cfg.model, resolve=True),
                          OmegaConf.to_container(cfg.loss, resolve=True))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model/loss config: {exc}") from exc
    return model.to(device)


def pipeline_config(cfg: DictConfig):
    """tcore.pipelines PipelineConfig from the `data` section (sampling ranges + `pipeline`;
    a `data.pipeline.sampling` that says otherwise is refused, not overwritten)."""
    from tcore.config import build_pipeline_config
    return build_pipeline_config(cfg)


def load_shards_for_device(cfg: DictConfig, manifests: list[Path], device: torch.device):
    """The ShardSet (manifests, layouts, tar and index sizes read) with its codecs checked
    against the decoder this device uses, as the loader checks them: a bad set fails here,
    before the run directory is made, and the loader is built from it without reading the
    files again."""
    from tcore.pipelines.manifest import (check_codecs_for_device, decodes_video_on_gpu,
                                          load_shard_set)
    shard_set = load_shard_set([str(m) for m in manifests])
    on_gpu = device.type == "cuda"
    check_codecs_for_device(shard_set, decodes_video_on_gpu(shard_set, on_gpu,
                                                            pipeline_config(cfg).video_decoder))
    return shard_set


def build_train_loader(cfg: DictConfig, shard_set, info: DistInfo):
    """The DALI loader, sharded by rank, endless (epochs are counted in steps)."""
    from tcore.pipelines.loader import build_loader
    return build_loader(shard_set, cfg.data.batch_size_per_gpu,
                        device=info.device, config=pipeline_config(cfg),
                        seed=int(cfg.train.seed), shard_id=info.rank,
                        num_shards=info.world_size, num_threads=int(cfg.data.num_threads),
                        infinite=True)


def parallel_mode(cfg: DictConfig, info: DistInfo) -> str:
    """What `train.parallel` means at this world size: "single", "ddp" or "fsdp"."""
    if info.enabled:
        return str(cfg.train.parallel)
    if cfg.train.parallel == "fsdp" and info.is_main:
        print("tcore train: train.parallel=fsdp has no effect at world size 1 (nothing to "
              "shard); training in a single process", file=sys.stderr)
    return "single"


def wrap_for_parallel(module: LossModule, parallel: str, info: DistInfo) -> nn.Module:
    """DDP wraps the loss module; FSDP shards the model inside it in place (build the
    optimizer afterwards, over the sharded parameters); a single process runs it as is."""
    if parallel == "single":
        return module
    if parallel == "fsdp":
        from tcore.fsdp import shard_model
        shard_model(module.model, info.device)
        return module
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _gather(obj, info: DistInfo) -> list:
    """Every rank's `obj` (rank order), for per-rank RNG and loader state."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def compiled(module: nn.Module, train_cfg) -> nn.Module:
    """`torch.compile` of the loss module with the config's backend and mode (a mode is
    passed only when it is not the default, since only Inductor takes one)."""
    mode = train_cfg.get("compile_mode", "default")
    extra = {} if mode == "default" else {"mode": mode}
    return torch.compile(module, backend=train_cfg.compile_backend, **extra)


# The batch entries whose first dimension is the batch's masked-token count.
MASKED_TOKEN_ENTRIES = ("mask_indices", "mask_weights")


def compile_inputs(batch: dict) -> dict:
    """The batch as the compiled step should see it: every size static but the masked-token
    count, which the mask ladder draws anew each batch (marked dynamic, so the first compile
    is the only one; left to find out, torch.compile compiles for the first batch's count,
    then again for any count at the second).

    Each tensor is handed over as a fresh `detach()` of itself (same storage, no copy): a
    tensor that came out of another compiled function, such as the loader's colour stage
    (compiled with dynamic shapes), carries that function's marks, every dimension "maybe
    dynamic", and the step would be traced with symbolic crop sizes. Inductor then writes
    kernels for unknown sizes, and with torch 2.11 on an H200 it aborted the compile (an
    Inductor AssertionError in tiling_utils.get_pw_red_splits). A fresh tensor object
    carries no marks."""
    fresh = {name: value.detach() if torch.is_tensor(value) else value
             for name, value in batch.items()}
    for name in MASKED_TOKEN_ENTRIES:
        if name in fresh:
            torch._dynamo.maybe_mark_dynamic(fresh[name], 0)
    return fresh


class Trainer:
    """Model, optimizer, scaler, schedules and loader of one run, and the step over them."""

    def __init__(self, cfg: DictConfig, loader, info: DistInfo):
        self.cfg, self.loader, self.info = cfg, loader, info
        self.device = info.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.parallel = parallel_mode(cfg, info)
        self.model = build_model(cfg, self.device)
        self.global_batch = int(cfg.data.batch_size_per_gpu) * info.world_size
        self.schedules = build_schedules(cfg.optim, self.global_batch)
        # Mixed precision is autocast in every mode, so FSDP computes exactly what DDP does;
        # FSDP2's MixedPrecisionPolicy (low-precision parameters and reductions) would not.
        self.loss_module = wrap_for_parallel(LossModule(self.model), self.parallel, info)
        # After wrapping: under FSDP the optimizer must hold the sharded parameters.
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        # fp16 under FSDP: the scaler's inf/NaN check on DTensor gradients is reduced over
        # all shards by DTensor, so every rank skips (or takes) the same steps.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.forward = compiled(self.loss_module, cfg.train) if cfg.train.compile \
            else self.loss_module
        self.clip_grad = float(cfg.optim.clip_grad)
        self.teacher_temp = torch.zeros((), device=self.device)

    def step(self, it: int, batch: dict) -> tuple[dict, dict]:
        """One optimisation step at global iteration `it`; returns (losses, schedule values)."""
        values = apply_schedules(self.optimizer, self.schedules, it)
        # A device tensor, not a float: torch.compile would otherwise recompile for every new
        # value; fill_ launches a kernel, where a fresh host->device copy would sync the host.
        self.teacher_temp.fill_(values["teacher_temp"])
        if self.forward is not self.loss_module:
            batch = compile_inputs(batch)
        with autocast_context(self.precision, self.device):
            losses = self.forward(batch, self.teacher_temp)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            self.model.clip_gradients(self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.update_teacher(values["momentum"])
        return losses, values

    def _check_precision(self, state: dict, source: Path) -> None:
        """A resumed run computes in the checkpoint's precision: the fp16 gradient scaler's
        state exists only in fp16 runs, and `auto` resolves by GPU, so the same config can
        mean bf16 on one machine and fp16 on another. (Checkpoints from before the
        precision was saved tell fp16 by their scaler state.)"""
        saved = state.get("precision") or ("fp16" if state.get("scaler") else None)
        if saved is None:
            mismatch = self.precision == "fp16"
            saved = "bf16 or fp32"
        else:
            mismatch = saved != self.precision
        if mismatch:
            raise ConfigError(
                f"{source}: trained in {saved}, but this run computes in {self.precision} "
                f"(train.precision={self.cfg.train.precision}); exact resumption needs the "
                f"checkpoint's precision: set train.precision to it")

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def _model_state(self) -> dict:
        if self.sharded:
            from tcore.fsdp import full_model_state
            return full_model_state(self.model)
        return self.model.state_dict()

    def _optimizer_state(self) -> dict:
        if self.sharded:
            from tcore.fsdp import full_optimizer_state
            return full_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    def state_dict(self, step: int) -> dict:
        """Everything a resumed run needs (collective: every rank must call it).

        The same layout in every mode: under FSDP model and optimizer are gathered into full
        tensors, complete on rank 0 only (the rank that saves)."""
        return {"step": step, "model": self._model_state(),
                "optimizer": self._optimizer_state(), "scaler": self.scaler.state_dict(),
                "loader": _gather(self.loader.state_dict(), self.info),
                "rng": _gather(rng_state(), self.info),
                "world_size": self.info.world_size, "parallel": self.parallel,
                "precision": self.precision,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                # Where the shards were (the loader checks what they hold, not where): named
                # when a resume is given other shards.
                "data_dirs": [m["_dir"] for m in self.loader.shard_set.manifests]}

    @staticmethod
    def _check_layout(state: dict, source: Path) -> None:
        """Checkpoints of tcore before 2026-11-27 held the cls position folded into
        cls_token: they evaluate as before (`tcore eval` reads them), but their optimizer
        state has no entry for `cls_pos_embed`, so training cannot continue from them."""
        names = state.get("model", {})
        if any(n.endswith("cls_token") for n in names) and \
                not any(n.endswith("cls_pos_embed") for n in names):
            raise ConfigError(f"{source}: written by an earlier tcore, whose backbone folded "
                              "the cls position into cls_token; `tcore eval` reads it, but "
                              "training cannot resume from it (start a new run)")

    def load_state_dict(self, state: dict, source: Path) -> int:
        """Restore a checkpoint of any mode (the layout is shared) at the same world size."""
        if state.get("world_size", 1) != self.info.world_size:
            raise ConfigError(f"{source}: written by {_processes(state['world_size'])}, "
                              f"resuming with {self.info.world_size}; exact resumption needs "
                              f"the same number of processes: start it with "
                              f"{state['world_size']} in all")
        self._check_precision(state, source)
        self._check_layout(state, source)
        if self.sharded:
            from tcore.fsdp import load_full_model_state, load_full_optimizer_state
            load_full_model_state(self.model, state["model"])
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        try:
            self.loader.load_state_dict(state["loader"][self.info.rank])
        except ValueError as exc:   # other shards, batch size or seed: name the checkpoint
            trained_on = ("" if "other shards" not in str(exc) or not state.get("data_dirs")
                          else f" (the run was trained on {', '.join(state['data_dirs'])})")
            raise ConfigError(f"{source}: {exc}{trained_on}") from exc
        set_rng_state(state["rng"][self.info.rank])
        return int(state["step"])

    def _full_teacher_backbone(self) -> nn.Module | None:
        """The teacher backbone with full tensors on rank 0, None elsewhere (collective)."""
        teacher = self.model.teacher_backbone()
        if not self.sharded:
            return teacher if self.info.is_main else None
        from tcore.fsdp import gathered_copy
        from tcore.ssl import backbone_from_config
        return gathered_copy(teacher, lambda: backbone_from_config(self.model.model_cfg, 0.0))

    def export_teacher(self, path: Path) -> Path | None:
        """Write the teacher backbone as safetensors from rank 0 (its path there, None on the
        other ranks). Collective: under FSDP every rank must call it."""
        from tcore.models import export_safetensors
        backbone = self._full_teacher_backbone()
        if backbone is None:
            return None
        export_safetensors(backbone, path, durable=True)
        return path


UNSET = "<unset>"          # a key one of the two configs lacks
SHOWN_DIFFERENCES = 5      # a refused resume lists this many changed keys


def config_differences(saved, current, prefix: str = "", free=frozenset()) -> list[str]:
    """`key: saved -> current` for every leaf that differs (missing leaves read <unset>),
    except the keys in `free`."""
    if prefix in free:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in config_differences(saved.get(key, UNSET), current.get(key, UNSET),
                                               f"{prefix}.{key}" if prefix else str(key), free)]
    if saved == current:
        return []
    return [f"{prefix}: {saved!r} -> {current!r}"]


def check_resumable_config(cfg: DictConfig, saved: dict, source: Path) -> None:
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = [line for section in RESUME_LOCKED_SECTIONS
               for line in config_differences(saved.get(section, UNSET),
                                              current.get(section, UNSET), section,
                                              RESUME_FREE_KEYS)]
    changed += [line for key in RESUME_LOCKED_KEYS
                for line in config_differences(_leaf(saved, key), _leaf(current, key), key)]
    if changed:
        more = len(changed) - SHOWN_DIFFERENCES
        listed = "; ".join(changed[:SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
        raise ConfigError(f"{source}: this run's config differs from the checkpoint's "
                          f"(checkpoint -> now: {listed}); resume with the config the "
                          f"checkpoint was trained with (the same preset and overrides, or "
                          f"the run's config.yaml as the run wrote it)")


def _leaf(config: dict, dotted: str):
    """config["a"]["b"] for "a.b"; UNSET where a level is missing."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return UNSET
        config = config[part]
    return config


def train(cfg: DictConfig, data, output: str | os.PathLike | None = None, *,
          resume: bool = False, max_steps: int | None = None,
          checkpoint_every: int | None = None, progress: bool = True,
          show_plan: bool = True) -> TrainResult:
    """Train T-CoRe on the shards in `data`; write everything under `output`. `show_plan`:
    print what the run is about to do (tcore.run_plan) to stderr when it starts."""
    cfg, run_dir = _run_config(cfg, output, max_steps, checkpoint_every)
    info = init_distributed(cfg.train.device)
    try:
        # Checks that need no run directory come first, so a mistyped --data, bad shards or
        # a precision this machine lacks leave no empty RUN_DIR behind.
        shard_set = load_shards_for_device(cfg, resolve_manifests(data), info.device)
        resolve_precision(cfg.train.precision, info.device)
        make_output_directory(run_dir, f"--output {run_dir}")
        if not resume:
            check_new_run_directory(run_dir)
        with (run_directory_lock(run_dir) if info.is_main else contextlib.nullcontext(),
              StopRequest().listening() as stop):
            return _train(cfg, shard_set, run_dir, info, stop, resume=resume,
                          max_steps=max_steps, progress=progress, show_plan=show_plan)
    finally:
        shutdown(info)


def _run_config(cfg: DictConfig, output, max_steps: int | None,
                checkpoint_every: int | None) -> tuple[DictConfig, Path]:
    """The run's config (a copy, with --output and --checkpoint-every in it) and its
    directory; --max-steps checked."""
    output = output or cfg.train.output
    if not output:
        raise ConfigError("no run directory: pass --output RUN_DIR (or set train.output)")
    run_dir = Path(output)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.train.output = str(run_dir)
    if checkpoint_every is not None:
        cfg.train.checkpoint_every = checkpoint_every
        validate_config(cfg, f"--checkpoint-every {checkpoint_every}")   # the config's rule
    if max_steps is not None and int(max_steps) < 1:
        raise ConfigError(f"--max-steps {max_steps}: need an integer > 0 (the step of the run "
                          "to stop at)")
    return cfg, run_dir


def dry_run(cfg: DictConfig, data, output: str | os.PathLike | None = None, *,
            resume: bool = False, max_steps: int | None = None,
            checkpoint_every: int | None = None, world_size: int = 1) -> list[str]:
    """What `train` with these arguments would do, as lines: where it starts and the plan
    for `world_size` processes. From the config, the manifests and a listing of the run
    directory only: nothing is written, and no device or process group is touched, so a
    machine without the GPUs (a login node) can plan the job. The same refusals as `train`
    for a bad config, bad manifests, an unusable --output, checkpoints without --resume, and
    a resume whose config differs from the run's (RUN_DIR/config.yaml, as the run saved it);
    not the device's (codecs, precision) or the checkpoint's own (read when it resumes:
    its data and loader state)."""
    from tcore.pipelines.manifest import load_shard_set
    cfg, run_dir = _run_config(cfg, output, max_steps, checkpoint_every)
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: need an integer > 0")
    shard_set = load_shard_set([str(m) for m in resolve_manifests(data)])
    check_output_path(run_dir, f"--output {run_dir}")
    if not resume:
        check_new_run_directory(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    refuse_checkpoints_without_resume(run_dir, ckpt_dir, resume)
    found = list_checkpoints(ckpt_dir) if resume else []
    start_step, checkpoint = found[-1] if found else (0, None)
    if checkpoint is not None and (run_dir / CONFIG_FILE).is_file():
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
        check_resumable_config(cfg, saved, run_dir / CONFIG_FILE)
    start, _ = _start_message(run_dir, ckpt_dir, resume, start_step, checkpoint)
    total = schedule_length(cfg.optim)
    end = min(total, max_steps) if max_steps else total
    if start_step >= end:
        start = f"nothing to train: {run_dir} is at step {start_step:,} already"
    precision = AUTO_PRECISION if cfg.train.precision == "auto" else str(cfg.train.precision)
    setting = RunSetting(world_size=world_size, precision=precision,
                         parallel=str(cfg.train.parallel) if world_size > 1 else "single",
                         device=f"train.device={cfg.train.device}")
    stop = stop_note(max_steps, total) if start_step < end else ""
    return [f"tcore train --dry-run: {start}{stop}; nothing written",
            *plan_lines(cfg, shard_set, setting, start_step, end)]


def refuse_checkpoints_without_resume(run_dir: Path, ckpt_dir: Path, resume: bool) -> None:
    if not resume and latest_checkpoint(ckpt_dir) is not None:
        raise FileExistsError(f"{run_dir}: already holds checkpoints; pass --resume to "
                              f"continue that run, or choose another --output")


def check_new_run_directory(run_dir: Path) -> None:
    """A new run (no --resume) goes into a missing or empty directory, or one that holds only
    a run's own files (a start that ended before its first checkpoint), not among other
    files (shards, say, when --output names the --data folder), which its writes and
    clean-ups would mix with."""
    if not run_dir.is_dir():
        return
    foreign = sorted(entry.name for entry in run_dir.iterdir()
                     if entry.name not in RUN_ENTRIES and not entry.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"{run_dir}: holds files that are not a tcore run's ({shown}); "
                              "choose a new or empty --output")


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def run_directory_lock(run_dir: Path):
    """Rank 0's lock on RUN_DIR/.lock for the whole run (tcore.preprocess.locks): a second
    `tcore train` into the same directory stops at once, before its start-up could remove
    the live run's temporaries."""
    run_dir = Path(run_dir)
    return exclusive_lock(run_dir / RUN_LOCK, lambda holder: (
        f"{run_dir}: another tcore train ({holder}) is training into this run directory; "
        "wait for it to end, or choose another --output"))


def skipped_samples(loader) -> int | None:
    """Bad samples the loader skipped so far (`data.pipeline.skip_bad_samples`), else None."""
    if not getattr(getattr(loader, "config", None), "skip_bad_samples", False):
        return None
    return getattr(loader, "skipped_count", None)


def _train(cfg: DictConfig, shard_set, run_dir: Path, info: DistInfo,
           stop: StopRequest, *,
           resume: bool, max_steps: int | None, progress: bool,
           show_plan: bool = True) -> TrainResult:
    ckpt_dir = run_dir / "checkpoints"
    _prepare_run_directory(run_dir, ckpt_dir, resume, info)
    torch.manual_seed(int(cfg.train.seed) + info.rank)
    loader = build_train_loader(cfg, shard_set, info)
    trainer = Trainer(cfg, loader, info)
    start_step, last_ckpt = _load_newest_checkpoint(trainer, ckpt_dir) if resume else (0, None)
    total = trainer.schedules.total_iters
    # A run resumed past --max-steps (or its schedule's end) trains nothing: it stays where
    # it is, not "at" the smaller number.
    end_step = max(start_step, min(total, max_steps) if max_steps else total)
    if info.is_main:  # after the resume check, so a refused resume keeps the saved config
        save_config(cfg, run_dir / CONFIG_FILE)
        start, notable = _start_message(run_dir, ckpt_dir, resume, start_step, last_ckpt)
        if show_plan:
            _print_plan(cfg, shard_set, trainer, start, max_steps, start_step, end_step)
        elif notable:
            print(f"tcore train: {start}", file=sys.stderr)
    if info.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    logger = MetricsLogger(run_dir, start_step, end_step,
                           samples_per_step=trainer.global_batch, enabled=info.is_main,
                           progress=progress)
    history = LossHistory()
    log_every, ckpt_every = int(cfg.train.log_every), int(cfg.train.checkpoint_every)
    teacher_path = run_dir / TEACHER_EXPORT
    exported, step, stopped_by = None, start_step, None
    try:
        iterator = iter(loader)
        values = trainer.schedules.at(start_step)
        # The loop's CUDA stream (train.step_stream): next() inside it too, so the loader
        # hands each batch over to the stream the step runs on.
        with step_stream(cfg.train.step_stream, info.device):
            for it in range(start_step, end_step):
                asked = time.perf_counter()
                batch = next(iterator)
                logger.add_data_wait(time.perf_counter() - asked)
                losses, values = trainer.step(it, batch)
                step = it + 1  # steps done
                history.add(step, losses)
                is_last = step == end_step
                if step % log_every == 0 or step % ckpt_every == 0 or is_last:
                    # Mean over ranks, so all ranks log and stop alike; raises on NaN/inf
                    # before anything is saved.
                    logger.log(history.drain(lambda t: all_reduce_mean_(t, info)), values,
                               skipped_samples(loader))
                    stopped_by = stop.agreed(info)   # a sync point already: no extra host wait
                if step % ckpt_every == 0 or is_last or stopped_by:
                    state = trainer.state_dict(step)
                    if info.is_main:
                        last_ckpt = save_checkpoint_or_say_what_is_kept(
                            ckpt_dir, step, state, int(cfg.train.keep_last), last_ckpt)
                    del state
                    exported = trainer.export_teacher(teacher_path)  # None except on rank 0
                    barrier(info)
                if stopped_by:
                    break
    except NonFiniteLossError as exc:
        logger.log(exc.good_records, values)  # the finite steps before the bad one
        if info.is_main:
            print(f"tcore train: {exc}; last good checkpoint: {last_ckpt or 'none'}",
                  file=sys.stderr)
        raise
    except KeyboardInterrupt:   # Ctrl-C: say where the run can continue from
        if info.is_main:
            where = (f"newest checkpoint {last_ckpt}; continue with --resume" if last_ckpt
                     else "no checkpoint written yet")
            print(f"\ntcore train: interrupted after step {step}; {where}", file=sys.stderr)
        raise
    finally:
        logger.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    if end_step == start_step:  # nothing trained, so nothing exported yet
        exported = trainer.export_teacher(teacher_path)
    return TrainResult(run_dir=run_dir, start_step=start_step,
                       end_step=step if stopped_by else end_step, last_checkpoint=last_ckpt,
                       teacher_export=exported, metrics=run_dir / "metrics.jsonl",
                       is_main=info.is_main, stopped_by=stopped_by)


def _prepare_run_directory(run_dir: Path, ckpt_dir: Path, resume: bool, info: DistInfo) -> None:
    """Rank 0 removes what killed writes left and refuses checkpoints without --resume; the
    other ranks wait for it."""
    if info.is_main:
        remove_stale_temporaries(ckpt_dir)
        for name in (TEACHER_EXPORT, CONFIG_FILE):
            remove_stale_temporaries(run_dir, temporary_prefix(run_dir / name))
        refuse_checkpoints_without_resume(run_dir, ckpt_dir, resume)
    barrier(info)


def _load_newest_checkpoint(trainer: Trainer, ckpt_dir: Path) -> tuple[int, Path | None]:
    """(step, checkpoint) the run goes on from, its state loaded into `trainer`; (0, None)
    when there is none yet (--resume on a first start, or after one that ended before a
    checkpoint)."""
    newest = latest_checkpoint(ckpt_dir)
    if newest is None:
        return 0, None
    state = load_resume_state(ckpt_dir, newest)
    check_resumable_config(trainer.cfg, state.get("config", {}), newest)
    return trainer.load_state_dict(state, newest), newest


def _start_message(run_dir: Path, ckpt_dir: Path, resume: bool, start_step: int,
                   checkpoint: Path | None) -> tuple[str, bool]:
    """Where the run starts, and whether that is worth saying without the plan: a start at
    step 1 under --resume (a first start, or a typo) or over an earlier start's logs."""
    if start_step:
        return f"resuming after step {start_step:,} ({checkpoint})", False
    why = f"--resume: no checkpoint in {ckpt_dir}; " if resume else ""
    replaced = _replaced_history(run_dir)
    return f"{why}starting at step 1 in {run_dir}{replaced}", bool(why or replaced)


def _print_plan(cfg: DictConfig, shard_set, trainer: Trainer, start: str,
                max_steps: int | None, start_step: int, end_step: int) -> None:
    setting = RunSetting(world_size=trainer.info.world_size, parallel=trainer.parallel,
                         precision=trainer.precision, device=str(trainer.device))
    lines = [f"tcore train: {start}{stop_note(max_steps, trainer.schedules.total_iters)}",
             *plan_lines(cfg, shard_set, setting, start_step, end_step)]
    print("\n  ".join(lines), file=sys.stderr, flush=True)


def _replaced_history(run_dir: Path) -> str:
    """What a restart at step 1 replaces: the steps an earlier start logged."""
    metrics = run_dir / "metrics.jsonl"
    logged = (sum(1 for line in metrics.read_text().splitlines() if line.strip())
              if metrics.is_file() else 0)
    return (f" (the {logged} steps metrics.jsonl holds, and TensorBoard's, are replaced)"
            if logged else "")


def load_resume_state(ckpt_dir: Path, newest: Path) -> dict:
    """The newest checkpoint's state; if it cannot be read (damaged after it was written:
    tcore's own writes are atomic), the error says which older one a resume could use: the
    newest whose zip directory opens (a file cut short or emptied does not)."""
    try:
        return load_checkpoint(newest)
    except CheckpointError as exc:
        older = [path for _, path in list_checkpoints(ckpt_dir) if path != newest]
        whole = [path for path in older if zipfile.is_zipfile(path)]
        if whole:
            unreadable = [*older[older.index(whole[-1]) + 1:], newest]
            hint = (f"; to resume from {whole[-1].name} instead, move "
                    f"{', '.join(p.name for p in unreadable)} out of {ckpt_dir}")
        elif older:
            hint = (f"; the older {', '.join(p.name for p in older)} cannot be read either "
                    "(cut short or empty)")
        else:
            hint = ""
        raise CheckpointError(f"{exc}{hint}") from exc


def save_checkpoint_or_say_what_is_kept(ckpt_dir: Path, step: int, state: dict, keep_last: int,
                                        previous: Path | None) -> Path:
    """`save_checkpoint`; a failed write (disk full) says which checkpoint is still whole."""
    try:
        return save_checkpoint(ckpt_dir, step, state, keep_last)
    except OutputWriteError as exc:
        kept = f"{previous} is intact" if previous else "no earlier checkpoint of this run"
        raise OutputWriteError(f"{exc}; {kept}") from exc


def read_losses(run_dir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """step -> {term: value} from a run's metrics.jsonl (loss terms only)."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = {k[5:]: v for k, v in record.items() if k.startswith("loss/")}
    return losses
