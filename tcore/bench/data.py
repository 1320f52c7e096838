"""`tcore bench data`: throughput and batch latency of the loaders on the same shards.

Both loaders (the DALI pipeline and the torchvision/PyAV baseline) get the same shards, the
same views, the same batch size and the same thread budget, and are timed after a warm-up;
`stage-a` times the DALI loader's stage A alone (`StageAAlone`).
Batch latency is the wall time of one `next()` (with the device synchronised, so that
asynchronous GPU work is not hidden); throughput is samples over the wall time of a window of
consecutive batches, one figure per window, summarised over the windows.
"""
from __future__ import annotations

import gc
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from tcore.bench.flops import synchronizer
from tcore.bench.model import at_least, check_device
from tcore.bench.report import environment, resolve_device
from tcore.bench.stats import process_tree_cpu_seconds, summarize, summarize_rate, window_sums
from tcore.pipelines.arguments import check_seed

LOADERS = ("dali", "baseline", "stage-a")


@dataclass(frozen=True)
class DataBenchSettings:
    data: str = ""
    loader: str = "dali"
    device: str = "cpu"
    threads: int = 2
    batch: int = 8
    seconds: float = 20.0
    warmup_batches: int = 3
    repeats: int = 5        # throughput windows the measured batches are split into
    seed: int = 0
    overrides: str = ""     # pipeline-config overrides, "views.color_jitter=fast,views.n_local=4"

    def validate(self) -> "DataBenchSettings":
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {self.loader!r}")
        at_least(self, threads=1, batch=1, repeats=1, warmup_batches=0)
        check_seed(self.seed)
        if self.seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if not self.data:
            raise ValueError("bench data needs --data SHARDS (a shard directory)")
        if not Path(self.data).is_dir():
            raise ValueError(f"data {self.data!r} is not a directory")
        check_device(self.device)
        pipeline_config_from(self.overrides)  # a bad --set fails here, before any run
        return self


def build_named_loader(loader: str, shards: str, device: torch.device, threads: int,
                       batch: int, seed: int, config=None) -> Iterable[dict]:
    """The DALI loader or the baseline loader, configured identically (same views, an
    endless stream so the bench never runs into an epoch boundary)."""
    from tcore.pipelines.config import PipelineConfig

    config = config or PipelineConfig()
    if loader in ("dali", "stage-a"):
        from tcore.pipelines.loader import build_loader

        built = build_loader(shards, batch, device=str(device), config=config, seed=seed,
                             num_threads=threads, infinite=True)
        return built if loader == "dali" else StageAAlone(built)
    from tcore.pipelines.torchvision_loader import build_baseline_loader

    # The baseline's thread budget is its worker processes (one decoding thread each).
    return build_baseline_loader(shards, batch, device=str(device), config=config, seed=seed,
                                 num_workers=threads, infinite=True)


class StageAAlone:
    """The DALI loader's stage A and nothing after it, in this thread: each batch read,
    parsed, drawn (parameters, masks) and pickled as the process producer sends it. Stage A
    runs beside everything else, in a process of its own on a GPU, so its rate alone is the
    ceiling it puts on the DALI loader, on any device, and it needs no decoder."""

    def __init__(self, loader):
        from tcore.pipelines.stage_a import StageA

        self.loader = loader            # a DALI loader never started: its settings, its data
        self.stage = StageA(loader.stage_a_spec())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.stage.next_batch()
        pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        return {"labels": torch.tensor([s.label for s in batch.samples]),
                "frame_indices": torch.from_numpy(np.stack([p.frames for p in batch.params]))}

    def close(self) -> None:
        self.loader.close()     # the runs' index files, where stage A wrote any


def batches_queued(loader) -> int:
    """Batches a loader has in flight before the first is asked for: stage B's prefetch and
    those made ahead in its thread (the baseline's workers: none counted)."""
    return getattr(loader, "prefetch", 0) + getattr(loader, "ahead", 0)


def loader_clock(loader) -> dict:
    """The DALI loader's running time counters (nothing for the baseline): take one before
    and one after the measured batches and hand both to `dali_loader_details`."""
    if not hasattr(loader, "phase_seconds"):
        return {}
    return {"stage_a_seconds": loader.stage_a_seconds, "batches": loader.stage_a_batches,
            "phases": dict(loader.phase_seconds)}


def dali_loader_details(loader, before: dict, after: dict) -> dict:
    """What the DALI loader's "auto" settings resolved to, and where its time went per
    measured batch (between the `loader_clock` readings `before` and `after`; nothing for the
    baseline)."""
    if not hasattr(loader, "torch_photometric"):
        return {}
    details = {"video_decode": "nvdec" if loader.video_on_gpu else "cpu",
               "colour_stage": "torch" if loader.torch_photometric else "dali",
               "stage_a": loader.producer_kind, "assemble_ahead": loader.ahead}
    batches = max(1, after["batches"] - before["batches"])
    # Stage A's reading and drawing alone, in its thread or process: slower than the batch
    # latency, it would be the loader's limit.
    details["stage_a_ms_per_batch"] = 1e3 * (after["stage_a_seconds"]
                                             - before["stage_a_seconds"]) / batches
    # The consumer's host time per batch inside next(): waiting for stage B's outputs, copying
    # and finishing them (colour stage, uploads), and taking and feeding the next host batch;
    # with `assemble_ahead` those are the loader thread's, and next() only waits for it
    # ("ahead_wait").
    details["next_ms_per_batch"] = {
        name: 1e3 * (seconds - before["phases"].get(name, 0.0)) / batches
        for name, seconds in after["phases"].items()}
    return details


def pipeline_config_from(overrides: str):
    """PipelineConfig defaults with dotted `key=value` overrides (the `data.pipeline` keys of a
    training config), e.g. "views.color_jitter=fast,views.n_local=4"."""
    from omegaconf import OmegaConf

    from tcore.bench.report import split_overrides
    from tcore.pipelines.config import PipelineConfig

    items = split_overrides(overrides)
    values = OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}
    try:
        return PipelineConfig.from_dict(values).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"bench data --set {overrides!r}: {error}") from error


def views_of(config) -> dict:
    """The view sizes a loader with this PipelineConfig draws (what `bench table --targets`
    checks a run against)."""
    views = config.views
    return {"global_size": views.global_size, "local_size": views.local_size,
            "n_local": views.n_local}


def batch_size_of(batch: dict) -> int:
    return int(batch["labels"].shape[0])


def time_batches(iterator: Iterator[dict], *, seconds: float, warmup_batches: int,
                 device: torch.device, min_batches: int = 2) -> tuple[list[float], list[int]]:
    """(latency of each `next()`, samples in each batch) for about `seconds` of measuring."""
    sync = synchronizer(device)
    for _ in range(warmup_batches):
        next(iterator)
    sync()
    latencies, sizes = [], []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < min_batches:
        begin = time.perf_counter()
        batch = next(iterator)
        sync()
        latencies.append(time.perf_counter() - begin)
        sizes.append(batch_size_of(batch))
        del batch
    return latencies, sizes


def close_loader(loader) -> None:
    """Release a loader's worker threads/processes before the next one starts."""
    for name in ("close", "shutdown", "release"):
        method = getattr(loader, name, None)
        if callable(method):
            method()
            break
    gc.collect()


# Fewer timed batches or steps than this and each window holds one or two, so one slow or
# queued batch moves its rate.
MIN_TIMED = 10


def few_timed_warnings(count: int, what: str, option: str) -> list[str]:
    """The warning of a run that timed fewer than MIN_TIMED `what` (batches, steps), naming
    the `option` that gives it more; none for a longer run."""
    if count >= MIN_TIMED:
        return []
    return [f"only {count} {what} were timed: raise {option} for a steady figure "
            f"(>= {MIN_TIMED} {what})"]


def run_data_bench(settings: DataBenchSettings) -> dict:
    settings.validate()
    device = resolve_device(settings.device)
    build_start = time.perf_counter()
    config = pipeline_config_from(settings.overrides)
    loader = build_named_loader(settings.loader, settings.data, device, settings.threads,
                                settings.batch, settings.seed, config=config)
    try:
        iterator = iter(loader)
        # Past the batches made before the clock starts (the loader's prefetch), or the
        # first timed batches come out of that queue at no cost and inflate samples/s.
        warmup = max(settings.warmup_batches, batches_queued(loader) + 1)
        for _ in range(warmup):
            next(iterator)
        cpu_before, clock_before = process_tree_cpu_seconds(), loader_clock(loader)
        latencies, sizes = time_batches(iterator, seconds=settings.seconds, warmup_batches=0,
                                        device=device)
        cpu_after, clock_after = process_tree_cpu_seconds(), loader_clock(loader)
        build_and_warmup = time.perf_counter() - build_start - sum(latencies)
    finally:
        close_loader(loader)
    latency = summarize(latencies, "s")
    figures = {
        "samples_per_s": summarize_rate(window_sums(latencies, settings.repeats),
                                        window_sums(sizes, settings.repeats),
                                        "samples/s").as_dict(),
        "batch_latency": latency.as_dict(),
        "batch_latency_p50": latency.median,
        "batch_latency_p90": latency.p90,
        "batch_latency_p99": latency.p99,
        "overall_samples_per_s": sum(sizes) / sum(latencies),
        # CPU time of the whole process tree (loader threads, worker processes, prefetching
        # included) over the measured batches: steadier than wall time on a shared machine.
        "cpu_seconds_per_sample": (None if cpu_before is None
                                   else (cpu_after - cpu_before) / sum(sizes)),
    }
    details = {"batches": len(latencies), "samples": sum(sizes), "warmup_batches": warmup,
               "views": views_of(config),
               "measured_seconds": sum(latencies), "build_and_warmup_seconds": build_and_warmup}
    details.update(dali_loader_details(loader, clock_before, clock_after))
    return {"kind": "data", "settings": asdict(settings), "figures": figures,
            "details": details, "environment": environment(device),
            "warnings": few_timed_warnings(len(latencies), "batches", "--seconds")}
