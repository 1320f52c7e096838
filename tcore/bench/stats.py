"""Measurement harness for `tcore bench`: warm-up, repeats, and robust summaries.

Every figure tcore reports is a median over repeats with its spread (the interquartile
range), because the machines these run on are shared and a mean would follow the outliers.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default ("linear"): position q/100 * (n-1) in the sorted data.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass(frozen=True)
class Summary:
    """One figure: median over repeats, spread (IQR = p75 - p25), extremes and tail."""

    median: float
    spread: float
    p25: float
    p75: float
    p90: float
    p99: float
    min: float
    max: float
    n: int
    unit: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def relative_spread(self) -> float:
        return self.spread / self.median if self.median else float("nan")


def summarize(values: Sequence[float], unit: str = "") -> Summary:
    """Summarise repeated measurements of one quantity."""
    if not values:
        raise ValueError("cannot summarise zero measurements")
    p25, p75 = percentile(values, 25.0), percentile(values, 75.0)
    return Summary(
        median=median(values),
        spread=p75 - p25,
        p25=p25,
        p75=p75,
        p90=percentile(values, 90.0),
        p99=percentile(values, 99.0),
        min=float(min(values)),
        max=float(max(values)),
        n=len(values),
        unit=unit,
    )


def summarize_rate(seconds: Sequence[float], amounts: Sequence[float] | float,
                   unit: str = "") -> Summary:
    """Summarise a rate measured once per repeat: `amounts[i]` units of work (samples, or one
    amount for every repeat) done in `seconds[i]`.

    Each figure is that of the time per unit, inverted (the rate's quantile q is 1 / the
    time's quantile 100 - q): the median rate is then 1 / the median time per unit, so
    samples/s x step time = batch at any number of repeats. With an even number, the median
    of the rates themselves (the mean of the middle two) would not be the rate of the
    median time (the mean of the other two)."""
    if isinstance(amounts, numbers.Real):
        amounts = [amounts] * len(seconds)
    per_unit = [time / amount for time, amount in zip(seconds, amounts, strict=True)]
    if not per_unit:
        raise ValueError("cannot summarise zero measurements")

    def rate(q: float) -> float:
        time = percentile(per_unit, 100.0 - q)
        return 1.0 / time if time else math.inf

    p25, p75 = rate(25.0), rate(75.0)
    return Summary(median=rate(50.0), spread=p75 - p25, p25=p25, p75=p75, p90=rate(90.0),
                   p99=rate(99.0), min=rate(0.0), max=rate(100.0), n=len(per_unit), unit=unit)


def windows(values: Sequence, count: int) -> list[slice]:
    """`values` split into `count` consecutive, equally sized windows (at most one per value;
    the sizes differ by one where they do not divide)."""
    count = max(1, min(count, len(values)))
    bounds = [round(i * len(values) / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def window_sums(values: Sequence[float], count: int) -> list[float]:
    """The sum of each of the `count` windows of `values` (`windows`)."""
    return [sum(values[part]) for part in windows(values, count)]


def time_repeats(
    run_once: Callable[[], None],
    *,
    warmup: int,
    repeats: int,
    iterations: int = 1,
    synchronize: Callable[[], None] = lambda: None,
) -> list[float]:
    """Seconds per iteration of `run_once`, one value per repeat, after `warmup` calls.

    Each repeat times `iterations` back-to-back calls and divides, so that per-call launch
    gaps are included as they are in real use; `synchronize` waits for queued device work
    (asynchronous CUDA kernels) before the clock is read.
    """
    if repeats < 1 or iterations < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, iterations >= 1, warmup >= 0; got "
                         f"{repeats}, {iterations}, {warmup}")
    for _ in range(warmup):
        run_once()
    synchronize()
    per_iteration = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            run_once()
        synchronize()
        per_iteration.append((time.perf_counter() - start) / iterations)
    return per_iteration


def samples_rate(run: Callable[[], None], samples: int) -> dict:
    """Wall-clock samples/s and this process's CPU milliseconds per sample of one call of
    `run`, which handles `samples` samples (the decode probes in scripts/)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples_per_s": round(samples / wall, 1),
            "cpu_ms_per_sample": round(1000 * cpu / samples, 2)}


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process ended while we looked
        return None
    # The command name (field 2) may hold spaces; everything after its ')' is space-separated.
    return text[text.rindex(")") + 2:].split()


def process_tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and all its live descendants (Linux /proc).

    On a shared machine wall-clock rates follow the other jobs; CPU seconds spent per sample
    (loader threads and worker processes included) are the steadier figure. None where /proc
    is not available.
    """
    if not Path("/proc/self/stat").exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12).
        parents[entry.name] = fields[1]
        cpu[entry.name] = (int(fields[11]) + int(fields[12])) / ticks
    root = str(os.getpid())
    total = 0.0
    for pid, seconds in cpu.items():
        ancestor, hops = pid, 0
        while ancestor not in (root, "0", "1") and ancestor in parents and hops < 64:
            ancestor, hops = parents[ancestor], hops + 1
        if ancestor == root:
            total += seconds
    return total
