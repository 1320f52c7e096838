"""`tcore bench model`: the full T-CoRe train step on device-resident synthetic batches.

One step is `tcore.train.Trainer.step`, exactly what `tcore train` does per batch (METHOD.md
sections 5-6): schedules, forward and losses under autocast, backward (through a gradient
scaler for fp16), per-module gradient clipping, AdamW with the reference's parameter groups,
teacher EMA. No data loading is involved, so the figures are the model's ceiling;
`tcore bench train` measures the same step fed by a loader.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tcore.bench.flops import (PRECISION_DTYPES, count_flops, measure_matmul_peak,
                               peak_dtype_for, synchronizer)
from tcore.bench.report import environment, resolve_device, split_overrides
from tcore.bench.stats import (process_tree_cpu_seconds, summarize, summarize_rate,
                               time_repeats)
from tcore.pipelines.arguments import check_seed
from tcore.synthetic_batch import make_synthetic_batch

TEACHER_TEMP = 0.07         # value after warm-up; the temperature does not change the cost
BENCH_ITERATION = 20 * 936  # a step past warm-up and last-layer freeze: every lr is non-zero


@dataclass(frozen=True)
class ModelBenchSettings:
    arch: str = "vit_small"
    batch: int = 64
    attention: str = "auto"
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on the CPU (as training)
    compile: bool = False
    device: str = "auto"
    n_local: int = 8
    global_size: int = 224  # crop sizes of the synthetic batch (the contract's are 224 / 96;
    local_size: int = 96    # smaller ones only to keep CPU tests fast)
    warmup: int = 5
    repeats: int = 5
    steps: int = 5          # steps timed back to back per repeat
    peak_size: int = 0      # matmul size for the peak rate (0 = device default)
    seed: int = 0
    overrides: str = ""     # training-config overrides, "model.head.prototypes=4096,..."

    def validate(self) -> "ModelBenchSettings":
        if self.arch not in arch_names():
            raise ValueError(f"arch must be one of {arch_names()}, got {self.arch!r}")
        if self.precision not in (*PRECISION_DTYPES, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}")
        check_attention(self.attention)
        at_least(self, batch=1, repeats=1, steps=1, warmup=0, n_local=0, global_size=16,
                 local_size=16, peak_size=0)
        check_seed(self.seed)
        for name in ("global_size", "local_size"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name} must be a multiple of the 16-px patch, got {getattr(self, name)}")
        check_device(self.device)
        refuse_option_keys(self.overrides, MODEL_OPTION_KEYS)
        # The config with the overrides, built here (a bad key fails before any run).
        bench_config(self.arch, self.attention, self.precision, self.compile, self.batch,
                     torch.device("cpu"), overrides=size_overrides(self))
        return self


def arch_names() -> list[str]:
    from tcore.models.vit import ARCHS

    return sorted(ARCHS)


def check_attention(name: str) -> None:
    from tcore.models.attention import BACKENDS

    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {list(BACKENDS)}, got {name!r}")


def at_least(settings, **minimums: int) -> None:
    """ValueError naming the first setting below its minimum."""
    for name, minimum in minimums.items():
        if getattr(settings, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(settings, name)}")


def check_device(name: str) -> None:
    """The device names `resolve_device` takes (without needing the device to be there)."""
    base, _, index = name.partition(":")
    if base not in ("auto", "cpu", "cuda", "gpu") or (index and not index.isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda, gpu or cuda:N, got {name!r}")


# Config keys the benches set from their own options: set with --set, the report's labels
# (arch=, attention=, ...) would no longer say what ran.
MODEL_OPTION_KEYS = {"model.arch": "--arch", "model.attention": "--attention",
                     "train.precision": "--precision", "train.compile": "--compile",
                     "data.batch_size_per_gpu": "--batch", "train.device": "--device"}
TRAIN_OPTION_KEYS = {**MODEL_OPTION_KEYS, "data.num_threads": "--threads"}


def refuse_option_keys(overrides: str, option_keys: dict[str, str]) -> None:
    for item in split_overrides(overrides):
        key = item.split("=", 1)[0].strip()
        if key in option_keys:
            raise ValueError(f"--set {item!r}: {key} is set by {option_keys[key]}; use that "
                             "option (or --compare with it) instead")


# ---- the model and its step ----------------------------------------------------------------

def bench_config(arch: str, attention: str, precision: str, compile_: bool, batch: int,
                 device: torch.device, threads: int | None = None, overrides: str = ""):
    """The training config of the published ViT-S/16 run with the bench's settings over it;
    `overrides` (config dotlist, comma-separated) come last, e.g. a smaller head for tests."""
    from tcore.config import load_config

    items = [f"model.arch={arch}", f"model.attention={attention}",
             f"train.precision={precision}", f"train.compile={str(bool(compile_)).lower()}",
             f"data.batch_size_per_gpu={batch}", f"train.device={device.type}"]
    if threads:
        items.append(f"data.num_threads={threads}")
    return load_config("vits16_k400", items + split_overrides(overrides))


def build_trainer(cfg, device: torch.device):
    """`tcore.train.Trainer`: the very step `tcore train` runs (schedules, autocast, scaler,
    backward, per-module clipping, AdamW, teacher EMA), single process, no loader attached."""
    from tcore.distributed import DistInfo
    from tcore.train import Trainer

    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(cfg, None, info)
    trainer.model.train()
    return trainer


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def forward_backward_flops(model, batch: dict, precision: str, device: torch.device) -> int:
    """FLOPs of one step's forward and backward, counted with explicit-matmul attention.

    Fused attention kernels (xFormers, CPU SDPA) are invisible to FlopCounterMode, so the count
    runs with the `math` backend, whose matmuls are exactly the algorithmic attention FLOPs;
    the backend is restored afterwards. Optimizer and EMA are elementwise and not counted.
    """
    from tcore.models.attention import set_attention_backend

    backends = {layer: layer.backend for layer in model.modules() if hasattr(layer, "backend")}
    set_attention_backend(model, "math")
    try:
        def forward_backward():
            with autocast_context(precision, device):
                losses = model.forward_losses(batch, TEACHER_TEMP)
            losses["total"].backward()

        flops = count_flops(forward_backward)
    finally:
        for layer, backend in backends.items():
            layer.backend = backend
        model.zero_grad(set_to_none=True)
    return flops


def resolved_attention(requested: str, device: torch.device) -> str:
    from tcore.models.attention import resolve_backend

    return resolve_backend(requested, device.type)


# ---- memory ------------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cpu_peak_rss() -> int:
    """The process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: torch.device, cpu_peak_before: int | None = None
                ) -> tuple[int | None, str]:
    """(bytes, what they are): CUDA peak allocated since the reset, or the process's peak RSS
    on the CPU. That one only grows: if it did not grow past `cpu_peak_before` (taken when
    the run began), this run's own peak lies hidden under an earlier run's, so it is not
    measured (None) rather than the earlier run's figure repeated."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    peak = cpu_peak_rss()
    if cpu_peak_before is not None and peak <= cpu_peak_before:
        return None, "not measured"
    return peak, "process_max_rss"


# ---- the bench ----------------------------------------------------------------------------

def size_overrides(settings: ModelBenchSettings) -> str:
    """The user's overrides, with the model's image size following the synthetic crops."""
    if settings.global_size == 224:
        return settings.overrides
    return ",".join(filter(None, [f"model.img_size={settings.global_size}", settings.overrides]))


_PEAKS: dict[tuple, dict] = {}


def measured_peak(device: torch.device, dtype: torch.dtype, size: int) -> dict:
    """The matmul peak, measured once per process: both runs of a --compare share it, so
    their MFU ratio is their speed ratio and not noise in two peak measurements."""
    key = (str(device), dtype, size)
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_peak(device, dtype, size=size or None)
    return _PEAKS[key]


def run_model_bench(settings: ModelBenchSettings, profile_dir: str | None = None) -> dict:
    """Time the train step; return {"kind", "settings", "figures", "details", "environment"}."""
    settings.validate()
    device = resolve_device(settings.device)
    cpu_peak_before = cpu_peak_rss()  # before the model is built: its memory is the run's
    torch.manual_seed(settings.seed)
    cfg = bench_config(settings.arch, settings.attention, settings.precision, settings.compile,
                       settings.batch, device, overrides=size_overrides(settings))
    trainer = build_trainer(cfg, device)
    batch = make_synthetic_batch(settings.batch, device, n_local=settings.n_local,
                                 global_size=settings.global_size, local_size=settings.local_size,
                                 seed=settings.seed)

    # Counted before the first step so a compiled forward is never traced with `math`.
    flops_per_step = forward_backward_flops(trainer.model, batch, trainer.precision, device)

    last_losses = {}

    def step():
        last_losses["losses"], _ = trainer.step(BENCH_ITERATION, batch)

    sync = synchronizer(device)
    reset_peak_memory(device)
    for _ in range(settings.warmup):
        step()
    cpu_before = process_tree_cpu_seconds()
    step_seconds = time_repeats(step, warmup=0, repeats=settings.repeats,
                                iterations=settings.steps, synchronize=sync)
    cpu_after = process_tree_cpu_seconds()
    timed_samples = settings.batch * settings.repeats * settings.steps
    memory_bytes, memory_kind = peak_memory(device, cpu_peak_before)
    loss = float(last_losses["losses"]["total"].detach())  # the timed step computed something

    peak = measured_peak(device, peak_dtype_for(trainer.precision, device), settings.peak_size)
    step_time = summarize(step_seconds, "s")
    figures = {
        "step_time": step_time.as_dict(),
        # Rates of the step times (`summarize_rate`), median for median: samples/s x step
        # time = batch, and MFU = FLOPs per step / step time / peak (at the peak a step
        # would take flops / peak seconds).
        "samples_per_s": summarize_rate(step_seconds, settings.batch, "samples/s").as_dict(),
        "mfu": summarize_rate(step_seconds, flops_per_step / peak["flops_per_s"],
                              "fraction").as_dict(),
        "flops_per_step": flops_per_step,
        "flops_per_sample": flops_per_step / settings.batch,
        "achieved_flops_per_s": flops_per_step / step_time.median,
        "peak_flops_per_s": peak["flops_per_s"],
        "peak_memory": (None if memory_bytes is None else
                        {"median": memory_bytes, "spread": 0.0, "n": 1, "unit": "bytes"}),
        # Host CPU time over the timed steps: on a shared CPU, steadier than wall time.
        "cpu_seconds_per_sample": (None if cpu_before is None
                                   else (cpu_after - cpu_before) / timed_samples),
    }
    details = {
        "attention_resolved": resolved_attention(settings.attention, device),
        "precision_resolved": trainer.precision,
        "peak_matmul": peak,
        "peak_memory_kind": memory_kind,
        "loss_after_bench": loss,
        "n_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "n_masked_tokens": int(batch["n_masked"].item()),
        "flops_counted_with": "torch.utils.flop_counter.FlopCounterMode, math attention, "
                              "forward+backward of one step",
    }
    warnings = []
    if memory_bytes is None:
        warnings.append(f"peak_memory not measured: the process's peak RSS "
                        f"({cpu_peak_before / 2**20:.0f} MiB, reached before this run, e.g. by "
                        "the first run of a --compare) did not grow, so this run's own peak "
                        "cannot be told; run it alone for that figure")
    if figures["mfu"]["max"] > 1.0:
        warnings.append(f"MFU above 100% ({figures['mfu']['max']:.0%}): the matmul peak "
                        f"({peak['flops_per_s'] / 1e9:.0f} GFLOP/s) was measured slower than "
                        "the step ran, likely while other work shared the device; rerun on "
                        "an idle machine for an MFU figure")
    if profile_dir:
        details["profile"] = profile_steps(step, device, Path(profile_dir))
    return {"kind": "model", "settings": asdict(settings), "figures": figures,
            "details": details, "environment": environment(device), "warnings": warnings}


def profile_steps(step, device: torch.device, out_dir: Path, steps: int = 3) -> dict:
    """Kernel breakdown of a few steps: a Chrome trace, a text table of the top kernels
    (device time), one of the top operators by CPU time, headed by tcore's named ranges
    (the loader's `tcore.loader.*`: in the training thread, or in the loader's own with
    `assemble_ahead`), and the timeline summary
    (`tcore.bench.timeline`: device busy time per stream, the host's blocking calls)."""
    from torch.profiler import ProfilerActivity, profile

    from tcore.bench.timeline import activities_of, format_timeline, timeline_summary

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    all_threads = _all_threads()
    with profile(activities=activities, record_shapes=False,
                 experimental_config=all_threads) as profiler:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        synchronizer(device)()
        wall_us = (time.perf_counter() - began) * 1e6
    # Self time: each kernel/op counted once, not again in every op that calls it.
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = profiler.key_averages()
    table = averages.table(sort_by=sort_key, row_limit=40)
    table_path = out_dir / "kernels.txt"
    table_path.write_text(f"{steps} steps, sorted by {sort_key}\n{table}\n")
    cpu_table = averages.table(sort_by="cpu_time_total", row_limit=40)
    # tcore's own named ranges, whatever their rank (the loader's `tcore.loader.*`).
    ranges = "\n".join(f"{event.key:<40} {event.count:>5} calls {event.cpu_time_total / 1e3:>10.2f} ms"
                       for event in sorted(averages, key=lambda e: e.key)
                       if event.key.startswith("tcore."))
    threads = "every thread" if all_threads else "the training thread only"
    # `bench model` has no loader, so no ranges: say so rather than leave the heading bare.
    ranges = f"\n{ranges}" if ranges else " none"
    cpu_path = out_dir / "cpu.txt"
    cpu_path.write_text(f"{steps} steps, tcore ranges (CPU time, {threads}):{ranges}\n\n"
                        f"sorted by cpu_time_total\n{cpu_table}\n")
    timeline = timeline_summary(activities_of(profiler.events()), wall_us, steps)
    timeline_path = out_dir / "timeline.txt"
    timeline_path.write_text(format_timeline(timeline))
    trace_path = out_dir / "trace.json"
    profiler.export_chrome_trace(str(trace_path))
    return {"table": str(table_path), "cpu_table": str(cpu_path), "trace": str(trace_path),
            "timeline_table": str(timeline_path), "steps": steps, "timeline": timeline}


def _all_threads():
    """Kineto's setting to record every thread's operators and ranges, not only those of the
    thread that started the profiler: the loader's own thread (`assemble_ahead`) runs
    `tcore.loader.*` there. None (the default: this thread only) where torch lacks it."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        return None


# ---- attention agreement -------------------------------------------------------------------

def attention_agreement(arch: str = "vit_small", backends: tuple[str, str] = ("xformers", "sdpa"),
                        device: str = "auto", precision: str = "bf16", batch: int = 4,
                        seed: int = 0) -> dict:
    """Max differences between two attention backends on the same backbone and images, and
    on the attention operator alone.

    The backbone is built with LayerScale 1.0: at its initial 1e-5, attention moves the
    outputs by ~1e-5 and a backend without the 1/sqrt(d) scale, or one ignoring q and k,
    would still agree. The operator is compared on standard-normal q, k, v of the model's
    shapes (batch, tokens, heads, head dim), where attention is far from uniform.

    Returns per output ("cls", "patch", "attention") the max absolute difference and that
    difference relative to the output's max magnitude (for "attention", v's), plus the
    backends actually resolved.
    """
    from tcore.models import build_backbone
    from tcore.models.attention import multi_head_attention, set_attention_backend

    for backend in backends:
        check_attention(backend)
    if backends[0] == backends[1]:
        raise ValueError(f"both backends are {backends[0]!r}: nothing to compare")
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    torch_device = resolve_device(device)
    ran = [resolved_attention(backend, torch_device) for backend in backends]
    if ran[0] == ran[1]:   # e.g. xformers falling back to sdpa: a pass would mean nothing
        raise ValueError(f"{backends[0]} vs {backends[1]}: both run as {ran[0]} on "
                         f"{torch_device.type} here, so nothing would be compared; choose "
                         "another --attention or --reference (e.g. math)")
    torch.manual_seed(seed)
    backbone = build_backbone(arch, attention=backends[0], layerscale=1.0).to(torch_device).eval()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 224, 224, generator=generator).to(torch_device)
    layer = backbone.blocks[0].attn
    tokens = backbone.num_prefix_tokens + (224 // backbone.patch_embed.patch_size[0]) ** 2
    dtype = torch.float32 if precision == "fp32" else PRECISION_DTYPES[precision]
    qkv = [torch.randn(batch, tokens, layer.num_heads, layer.head_dim, generator=generator)
           .to(torch_device, dtype) for _ in range(3)]
    outputs = {}
    resolved = []
    for backend in backends:
        set_attention_backend(backbone, backend)
        resolved.append(resolved_attention(backend, torch_device))
        with torch.no_grad(), autocast_context(precision, torch_device):
            features = backbone.forward_features(images)
            operator = multi_head_attention(*qkv, backend)
        outputs[backend] = {**{k: features[k].float() for k in ("cls", "patch")},
                            "attention": operator.float()}
    first, second = (outputs[b] for b in backends)
    # Attention mixes the rows of v, so any correct output lies within v's range: that range
    # is the operator's scale (its own output, an average, is smaller and noisier in bf16).
    scales = {"cls": first["cls"].abs().max().item(), "patch": first["patch"].abs().max().item(),
              "attention": qkv[2].float().abs().max().item()}
    differences = {}
    for key, scale in scales.items():
        max_abs = (first[key] - second[key]).abs().max().item()
        differences[key] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs}
    return {"arch": arch, "precision": precision, "backends": list(backends),
            "resolved": resolved, "differences": differences, "layerscale": 1.0,
            "environment": environment(torch_device)}
