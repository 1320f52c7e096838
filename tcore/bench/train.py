"""`tcore bench train`: the real thing end to end, the loader feeding the full train step.

Steps run as in training, the device synchronised only at the end of each timing window.
The host time spent inside the loader's `next()` is data wait: with a loader that keeps ahead
of the model it is close to zero, and `data_wait_fraction` says how much of each window the
training loop sat blocked on data. The step is `tcore.train.Trainer.step`, the same one
`bench model` times on synthetic batches, so `bench train` samples/s over `bench model`
samples/s is the end-to-end efficiency. The run also measures that model-only rate itself,
twice: the same step on one batch held on the device, in the same process with the same
(compiled) step, once before the timed windows with the loader idle and once after them
with the loader closed. The gap to it splits into the data wait and the step's own slowdown
beside a working loader; `end_to_end_fraction` is taken against the faster of the two.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tcore.bench.data import (batch_size_of, batches_queued, build_named_loader, close_loader,
                              dali_loader_details, few_timed_warnings, loader_clock, views_of)
from tcore.bench.flops import PRECISION_DTYPES, synchronizer
from tcore.bench.model import (BENCH_ITERATION, TRAIN_OPTION_KEYS, arch_names, at_least,
                               bench_config, build_trainer, check_attention, check_device,
                               profile_steps, refuse_option_keys, resolved_attention)
from tcore.bench.report import environment, resolve_device
from tcore.bench.stats import summarize, summarize_rate, window_sums, windows
from tcore.pipelines.arguments import check_seed
from tcore.step_stream import step_stream


# The loaders that can feed the step (`bench data`'s stage-a makes no views to train on).
TRAIN_LOADERS = ("dali", "baseline")


@dataclass(frozen=True)
class TrainBenchSettings:
    data: str = ""
    loader: str = "dali"    # one of TRAIN_LOADERS
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
        from tcore.train import pipeline_config

        if not self.data:
            raise ValueError("bench train needs --data SHARDS (a shard directory)")
        if not Path(self.data).is_dir():
            raise ValueError(f"data {self.data!r} is not a directory")
        if self.arch not in arch_names():
            raise ValueError(f"arch must be one of {arch_names()}, got {self.arch!r}")
        if self.precision not in (*PRECISION_DTYPES, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}")
        if self.loader not in TRAIN_LOADERS:
            raise ValueError(f"loader must be one of {TRAIN_LOADERS}, got {self.loader!r}")
        check_attention(self.attention)
        at_least(self, batch=1, steps=1, repeats=1, warmup=0, threads=1)
        check_seed(self.seed)
        if self.steps < self.repeats:
            # --steps is the total over all windows: fewer steps than windows would give
            # fewer windows than asked for, silently.
            raise ValueError(f"steps ({self.steps}) is the total over the --repeats windows: "
                             f"it must be >= repeats ({self.repeats})")
        check_device(self.device)
        refuse_option_keys(self.overrides, TRAIN_OPTION_KEYS)
        # The config and its pipeline, built here (a bad key fails before any run).
        cfg = bench_config(self.arch, self.attention, self.precision, self.compile, self.batch,
                           torch.device("cpu"), self.threads, self.overrides)
        pipeline_config(cfg)
        return self


def timed_windows(iterator, trainer, steps: int, repeats: int, device: torch.device
                  ) -> tuple[list[float], list[int], list[float], list[int], list[float]]:
    """Run `steps` steps in `repeats` windows, as training runs them: the device is
    synchronised only at the end of each window (as `bench model` does per repeat), so the
    host may prepare the next batch while the device still works on the last step.

    Returns per step the host time blocked in the loader's next() and the samples, per
    window its wall time and its number of steps, and per step the host time of next() and
    the step together (not synchronised per step, so one value is no step's device time, but
    a stall inside a window shows as one long step)."""
    sync = synchronizer(device)
    waits, sizes, window_times, window_steps, host_times = [], [], [], [], []
    sync()
    it = BENCH_ITERATION
    for part in windows(list(range(steps)), repeats):
        begin = time.perf_counter()
        for _ in range(part.stop - part.start):
            asked = time.perf_counter()
            batch = next(iterator)
            waits.append(time.perf_counter() - asked)
            trainer.step(it, batch)
            host_times.append(time.perf_counter() - asked)
            sizes.append(batch_size_of(batch))
            it += 1
        sync()
        window_times.append(time.perf_counter() - begin)
        window_steps.append(part.stop - part.start)
    return waits, sizes, window_times, window_steps, host_times


def model_only_windows(batch: dict, trainer, settle: int, steps: int, repeats: int,
                       device: torch.device) -> tuple[list[float], list[int], list[float]]:
    """The step alone on one batch held on the device: `settle` untimed steps, then
    `steps` steps in `repeats` windows. Returns each window's seconds and samples, and each
    step's host time."""
    held = itertools.repeat(batch)
    timed_windows(held, trainer, settle, 1, device)
    _, sizes, times, _, host_times = timed_windows(held, trainer, steps, repeats, device)
    return times, window_sums(sizes, repeats), host_times


def rates(seconds: list[float], samples: list[int]) -> list[float]:
    """Each window's samples/s, rounded for the report's details."""
    return [round(n / t, 1) for t, n in zip(seconds, samples)]


def run_train_bench(settings: TrainBenchSettings, profile_dir: str | None = None) -> dict:
    settings.validate()
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    cfg = bench_config(settings.arch, settings.attention, settings.precision, settings.compile,
                       settings.batch, device, settings.threads, settings.overrides)
    trainer = build_trainer(cfg, device)

    from tcore.train import pipeline_config

    config = pipeline_config(cfg)
    loader = build_named_loader(settings.loader, settings.data, device, settings.threads,
                                settings.batch, settings.seed, config=config)
    steps, repeats = settings.steps, settings.repeats
    # Both phases on the stream training would run on (train.step_stream), the loader's
    # next() too, as `tcore train` runs them.
    with step_stream(cfg.train.step_stream, device):
        try:
            iterator = iter(loader)
            # At least the batches queued before the first step (the loader's prefetch), or
            # the first timed steps take them at no wait and understate the data wait.
            warmup = max(settings.warmup, batches_queued(loader) + 1)
            timed_windows(iterator, trainer, warmup, 1, device)
            # Model only, before the timed steps: the loader left idle once it has filled
            # its queue (as many untimed steps as the warm-up let it). Timed twice, before and
            # after (below), because after the loader closes the step alone has come out 862
            # to 1,197 samples/s in one H200 lease: two phases that disagree say so.
            before = model_only_windows(next(iterator), trainer, warmup, steps, repeats,
                                        device)
            # The loader refilled its queue meanwhile: warm up again, as above.
            timed_windows(iterator, trainer, warmup, 1, device)
            clock_before = loader_clock(loader)
            waits, sizes, window_times, window_steps, host_times = timed_windows(
                iterator, trainer, steps, repeats, device)
            clock_after = loader_clock(loader)
            profile = None
            if profile_dir:
                # After the timed steps, so the profiler's overhead touches no figure.
                profile = profile_steps(lambda: trainer.step(BENCH_ITERATION, next(iterator)),
                                        device, Path(profile_dir))
            held = next(iterator)
        finally:
            close_loader(loader)
        # Model only after, the loader closed: one untimed step to settle, then the windows.
        after = model_only_windows(held, trainer, 1, steps, repeats, device)

    parts = windows(waits, repeats)     # the same split timed_windows made
    window_samples = window_sums(sizes, repeats)
    # Rates of the windows' times (`summarize_rate`): samples/s x step time = batch, median
    # for median, and so end_to_end_fraction is the ratio of the median step times.
    samples_per_s = summarize_rate(window_times, window_samples, "samples/s")
    model_only = summarize_rate(after[0], after[1], "samples/s")
    model_only_before = summarize_rate(before[0], before[1], "samples/s")
    figures = {
        "samples_per_s": samples_per_s.as_dict(),
        "step_time": summarize([t / n for t, n in zip(window_times, window_steps)], "s").as_dict(),
        "data_wait": summarize(waits, "s").as_dict(),
        "data_wait_fraction": summarize([sum(waits[w]) / t for w, t in zip(parts, window_times)],
                                        "fraction").as_dict(),
        # The step's time with the loader working beside it, the wait left out ...
        "step_time_without_wait": summarize(
            [(t - sum(waits[w])) / n for w, t, n in zip(parts, window_times, window_steps)],
            "s").as_dict(),
        # ... against the step alone on one held batch: after the loader closed, and before
        # the timed steps with the loader idle.
        "model_only_samples_per_s": model_only.as_dict(),
        "model_only_before_samples_per_s": model_only_before.as_dict(),
        # Against the faster of the two: what the step alone was shown to do.
        "end_to_end_fraction": samples_per_s.median / max(model_only.median,
                                                          model_only_before.median),
    }
    details = {"steps": len(waits), "samples": sum(sizes), "warmup_steps": warmup,
               "model_only_steps": len(after[2]),
               # each timed step's host time, next() and step together, in order
               "step_host_ms": [round(1e3 * t, 2) for t in host_times],
               "model_only_step_host_ms": [round(1e3 * t, 2) for t in after[2]],
               "model_only_before_step_host_ms": [round(1e3 * t, 2) for t in before[2]],
               # each window's rate in the order run: a drift (settling, a slow start) shows
               # here, where the medians above hide it
               "window_samples_per_s": {"end_to_end": rates(window_times, window_samples),
                                        "model_only": rates(*after[:2]),
                                        "model_only_before": rates(*before[:2])},
               "attention_resolved": resolved_attention(settings.attention, device),
               "precision_resolved": trainer.precision, "views": views_of(config),
               "step_stream": cfg.train.step_stream,
               **dali_loader_details(loader, clock_before, clock_after)}
    if profile:
        details["profile"] = profile
    return {"kind": "train", "settings": asdict(settings), "figures": figures,
            "details": details, "environment": environment(device),
            "warnings": few_timed_warnings(len(waits), "steps", "--steps")}
