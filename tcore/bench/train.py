"""`tcore bench train`: the real thing end to end, the loader feeding the full train step.

Per step, the time spent inside the loader's `next()` is data wait: with a loader that keeps
ahead of the model it is close to zero, and `data_wait_fraction` says how much of the step the
model sat idle for data. The step is `tcore.train.Trainer.step`, the same one `bench model`
times on synthetic batches, so `bench train` samples/s over `bench model` samples/s is the
end-to-end efficiency.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tcore.bench.data import batch_size_of, build_named_loader, close_loader
from tcore.bench.flops import PRECISION_DTYPES, synchronizer
from tcore.bench.model import (BENCH_ITERATION, bench_config, build_trainer, profile_steps,
                               resolved_attention)
from tcore.bench.report import environment, resolve_device
from tcore.bench.stats import summarize


@dataclass(frozen=True)
class TrainBenchSettings:
    data: str = ""
    loader: str = "dali"
    arch: str = "vit_small"
    batch: int = 64
    attention: str = "auto"
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on the CPU
    compile: bool = False
    device: str = "auto"
    threads: int = 4
    warmup: int = 3
    steps: int = 20
    repeats: int = 4        # windows the measured steps are split into
    seed: int = 0
    overrides: str = ""     # training-config overrides, "model.head.prototypes=4096,..."

    def validate(self) -> "TrainBenchSettings":
        if not self.data:
            raise ValueError("bench train needs --data SHARDS (a shard directory)")
        if self.precision not in (*PRECISION_DTYPES, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}")
        if self.batch < 1 or self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"batch, steps, repeats must be >= 1 and warmup >= 0: {self}")
        return self


def timed_steps(iterator, trainer, steps: int, device: torch.device
                ) -> tuple[list[float], list[float], list[int]]:
    """(data wait, whole step time, samples) per step; the device is synchronised per step."""
    sync = synchronizer(device)
    waits, totals, sizes = [], [], []
    sync()
    for it in range(BENCH_ITERATION, BENCH_ITERATION + steps):
        begin = time.perf_counter()
        batch = next(iterator)
        got_batch = time.perf_counter()
        trainer.step(it, batch)
        sync()
        waits.append(got_batch - begin)
        totals.append(time.perf_counter() - begin)
        sizes.append(batch_size_of(batch))
    return waits, totals, sizes


def windows(values: list, count: int) -> list[slice]:
    count = max(1, min(count, len(values)))
    bounds = [round(i * len(values) / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_train_bench(settings: TrainBenchSettings, profile_dir: str | None = None) -> dict:
    settings.validate()
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    cfg = bench_config(settings.arch, settings.attention, settings.precision, settings.compile,
                       settings.batch, device, settings.threads, settings.overrides)
    trainer = build_trainer(cfg, device)

    from tcore.train import pipeline_config

    loader = build_named_loader(settings.loader, settings.data, device, settings.threads,
                                settings.batch, settings.seed, config=pipeline_config(cfg))
    try:
        iterator = iter(loader)
        timed_steps(iterator, trainer, settings.warmup, device)
        waits, totals, sizes = timed_steps(iterator, trainer, settings.steps, device)
        profile = None
        if profile_dir:
            # After the timed steps, so the profiler's overhead touches no figure.
            profile = profile_steps(lambda: trainer.step(BENCH_ITERATION, next(iterator)),
                                    device, Path(profile_dir))
    finally:
        close_loader(loader)

    parts = windows(totals, settings.repeats)
    figures = {
        "samples_per_s": summarize([sum(sizes[w]) / sum(totals[w]) for w in parts], "samples/s").as_dict(),
        "step_time": summarize(totals, "s").as_dict(),
        "data_wait": summarize(waits, "s").as_dict(),
        "data_wait_fraction": summarize([sum(waits[w]) / sum(totals[w]) for w in parts],
                                        "fraction").as_dict(),
    }
    details = {"steps": len(totals), "samples": sum(sizes),
               "attention_resolved": resolved_attention(settings.attention, device),
               "precision_resolved": trainer.precision}
    if profile:
        details["profile"] = profile
    return {"kind": "train", "settings": asdict(settings), "figures": figures,
            "details": details, "environment": environment(device)}
