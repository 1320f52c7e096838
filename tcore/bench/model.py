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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tcore.bench.flops import (PRECISION_DTYPES, count_flops, measure_matmul_peak,
                               model_flops_utilisation, peak_dtype_for, synchronizer)
from tcore.bench.report import environment, resolve_device
from tcore.bench.stats import process_tree_cpu_seconds, summarize, time_repeats
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
        if self.precision not in (*PRECISION_DTYPES, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}")
        if self.batch < 1 or self.repeats < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError(f"batch, repeats and steps must be >= 1 and warmup >= 0: {self}")
        return self


# ---- the model and its step ----------------------------------------------------------------

def split_overrides(text: str) -> list[str]:
    """"a.b=1,c.d=2" -> ["a.b=1", "c.d=2"] (a comma inside [...] stays with its value)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


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


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA peak allocated, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


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
    memory_bytes, memory_kind = peak_memory(device)
    loss = float(last_losses["losses"]["total"].detach())  # the timed step computed something

    peak = measured_peak(device, peak_dtype_for(trainer.precision, device), settings.peak_size)
    step_time = summarize(step_seconds, "s")
    figures = {
        "step_time": step_time.as_dict(),
        "samples_per_s": summarize([settings.batch / s for s in step_seconds], "samples/s").as_dict(),
        "mfu": summarize([model_flops_utilisation(flops_per_step, s, peak["flops_per_s"])
                          for s in step_seconds], "fraction").as_dict(),
        "flops_per_step": flops_per_step,
        "flops_per_sample": flops_per_step / settings.batch,
        "achieved_flops_per_s": flops_per_step / step_time.median,
        "peak_flops_per_s": peak["flops_per_s"],
        "peak_memory": {"median": memory_bytes, "spread": 0.0, "n": 1, "unit": "bytes"},
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
    if profile_dir:
        details["profile"] = profile_steps(step, device, Path(profile_dir))
    return {"kind": "model", "settings": asdict(settings), "figures": figures,
            "details": details, "environment": environment(device)}


def profile_steps(step, device: torch.device, out_dir: Path, steps: int = 3) -> dict:
    """Kernel breakdown of a few steps: a Chrome trace, a text table of the top kernels
    (device time) and one of the top operators by CPU time, headed by tcore's named ranges
    (the loader's `tcore.loader.*`, run in the training thread)."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as profiler:
        for _ in range(steps):
            step()
        synchronizer(device)()
    # Self time: each kernel/op counted once, not again in every op that calls it.
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_key, row_limit=40)
    table_path = out_dir / "kernels.txt"
    table_path.write_text(f"{steps} steps, sorted by {sort_key}\n{table}\n")
    averages = profiler.key_averages()
    cpu_table = averages.table(sort_by="cpu_time_total", row_limit=40)
    # tcore's own named ranges, whatever their rank (the loader's `tcore.loader.*`).
    ranges = "\n".join(f"{event.key:<40} {event.count:>5} calls {event.cpu_time_total / 1e3:>10.2f} ms"
                       for event in sorted(averages, key=lambda e: e.key)
                       if event.key.startswith("tcore."))
    cpu_path = out_dir / "cpu.txt"
    cpu_path.write_text(f"{steps} steps, tcore ranges (CPU time, main thread):\n{ranges}\n\n"
                        f"sorted by cpu_time_total\n{cpu_table}\n")
    trace_path = out_dir / "trace.json"
    profiler.export_chrome_trace(str(trace_path))
    return {"table": str(table_path), "cpu_table": str(cpu_path), "trace": str(trace_path),
            "steps": steps}


# ---- attention agreement -------------------------------------------------------------------

def attention_agreement(arch: str = "vit_small", backends: tuple[str, str] = ("xformers", "sdpa"),
                        device: str = "auto", precision: str = "bf16", batch: int = 4,
                        seed: int = 0) -> dict:
    """Max differences between two attention backends on the same backbone and images.

    Returns per output ("cls", "patch") the max absolute difference and that difference
    relative to the output's max magnitude, plus the backends actually resolved.
    """
    from tcore.models import build_backbone
    from tcore.models.attention import set_attention_backend

    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    backbone = build_backbone(arch, attention=backends[0]).to(torch_device).eval()
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(torch_device)
    outputs = {}
    resolved = []
    for backend in backends:
        set_attention_backend(backbone, backend)
        resolved.append(resolved_attention(backend, torch_device))
        with torch.no_grad(), autocast_context(precision, torch_device):
            features = backbone.forward_features(images)
        outputs[backend] = {k: features[k].float() for k in ("cls", "patch")}
    first, second = (outputs[b] for b in backends)
    differences = {}
    for key in ("cls", "patch"):
        max_abs = (first[key] - second[key]).abs().max().item()
        scale = first[key].abs().max().item()
        differences[key] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs}
    return {"arch": arch, "precision": precision, "backends": list(backends),
            "resolved": resolved, "differences": differences,
            "environment": environment(torch_device)}
