"""Where the profiled steps' wall time went: how busy the device was, stream by stream, and
how long the host sat in calls that wait for the device.

Why: a step that runs slower beside the loader than alone (`bench train`'s
`step_time_without_wait` against `model_only_samples_per_s`) is either waiting for the host
(the device idles between kernels) or sharing the device with the loader's own kernels (DALI's
stream, the loader's copy and work streams). The kernel table cannot tell these apart; the
device's busy time per stream and the host's blocking calls can.
"""
from __future__ import annotations

from dataclasses import dataclass

# Per stream, the kernels (and copies) that took the most device time, listed in the text for
# the busiest streams: the loader's colour stage runs on a stream of its own, so its kernels
# show there apart from the step's.
TOP_KERNELS = 8
STREAMS_WITH_KERNELS = 3
# Streams below this share of the device's busy time are summed on one line (DALI runs tens
# of streams, each busy a fraction of a millisecond).
MINOR_STREAM_SHARE = 0.01

# Host calls that return only when the device has finished something.
BLOCKING_CALLS = frozenset({
    "cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
    "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize"})
# Host calls that put work on the device (Triton launches through the driver API).
LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
    "cuLaunchKernelEx", "cudaGraphLaunch"})


@dataclass(frozen=True)
class Activity:
    """One profiled interval: a host call (`stream` None) or device work on a stream."""
    name: str
    start_us: float
    end_us: float
    stream: int | None = None

    @property
    def on_device(self) -> bool:
        return self.stream is not None


def activities_of(events) -> list[Activity]:
    """The torch profiler's events (`profile.events()`) as activities: every device event
    (kernels, copies, sets) with its stream, and the host's blocking and launch calls."""
    from torch.autograd import DeviceType

    activities = []
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        if event.device_type == DeviceType.CUDA:
            activities.append(Activity(event.name, start, end, int(event.device_resource_id)))
        elif event.name in BLOCKING_CALLS or event.name in LAUNCH_CALLS:
            activities.append(Activity(event.name, start, end))
    return activities


def union_us(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    return sum(end - start for start, end in merged(intervals))


def merged(intervals) -> list[tuple[float, float]]:
    """(start, end) intervals merged into disjoint ones, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def shared_us(per_stream: list[list[tuple[float, float]]]) -> float:
    """Time during which two or more streams were busy at once."""
    edges = sorted((point, step) for intervals in per_stream
                   for start, end in merged(intervals) for point, step in ((start, 1), (end, -1)))
    total, busy, since = 0.0, 0, 0.0
    for point, step in edges:
        if busy >= 2:
            total += point - since
        busy += step
        since = point
    return total


def timeline_summary(activities: list[Activity], wall_us: float, steps: int) -> dict:
    """Device busy time (all streams together and per stream) and the host's blocking and
    launch calls, over `wall_us` of profiled wall time spanning `steps` steps."""
    device = [a for a in activities if a.on_device]
    by_stream: dict[int, list[Activity]] = {}
    for a in sorted(device, key=lambda a: a.stream):
        by_stream.setdefault(a.stream, []).append(a)
    per_stream = {stream: [(a.start_us, a.end_us) for a in work]
                  for stream, work in by_stream.items()}
    busy_ms = union_us((a.start_us, a.end_us) for a in device) / 1e3
    streams = {stream: {"busy_ms": union_us(spans) / 1e3, "activities": len(spans)}
               for stream, spans in per_stream.items()}
    for stream, figures in streams.items():
        if figures["busy_ms"] >= MINOR_STREAM_SHARE * busy_ms:     # not for DALI's tens
            figures["kernels"] = top_kernels(by_stream[stream])
    host = {}
    for call in activities:
        if not call.on_device:
            entry = host.setdefault(call.name, {"calls": 0, "ms": 0.0})
            entry["calls"] += 1
            entry["ms"] += (call.end_us - call.start_us) / 1e3
    wall_ms = wall_us / 1e3
    return {
        "steps": steps, "wall_ms": wall_ms,
        "device_busy_ms": busy_ms if device else None,
        "device_busy_fraction": busy_ms / wall_ms if device and wall_ms > 0 else None,
        # busy on two or more streams at once: the loader's kernels beside the step's
        "overlap_ms": shared_us(list(per_stream.values())) / 1e3 if device else None,
        "streams": streams,
        "blocking": {name: v for name, v in host.items() if name in BLOCKING_CALLS},
        "launches": {name: v for name, v in host.items() if name in LAUNCH_CALLS},
    }


def top_kernels(work: list[Activity], count: int = TOP_KERNELS) -> list[dict]:
    """The `count` names with the most device time in `work`: name, ms (summed) and calls."""
    by_name: dict[str, dict] = {}
    for a in work:
        entry = by_name.setdefault(a.name, {"name": a.name, "ms": 0.0, "calls": 0})
        entry["ms"] += (a.end_us - a.start_us) / 1e3
        entry["calls"] += 1
    return sorted(by_name.values(), key=lambda entry: -entry["ms"])[:count]


def format_timeline(summary: dict) -> str:
    steps, wall = summary["steps"], summary["wall_ms"]
    lines = [f"{steps} steps in {wall:.1f} ms of wall time ({wall / max(steps, 1):.1f} ms a step)"]
    if summary["device_busy_ms"] is None:
        lines.append("device: no device activity recorded (a CPU run)")
    else:
        busy = summary["device_busy_ms"]
        lines.append(f"device busy {busy:.1f} ms ({100 * summary['device_busy_fraction']:.1f}% "
                     f"of the wall time), idle {wall - busy:.1f} ms; busy on two or more "
                     f"streams at once {summary['overlap_ms']:.1f} ms")
        ranked = sorted(summary["streams"].items(), key=lambda item: -item[1]["busy_ms"])
        major = [item for item in ranked if item[1]["busy_ms"] >= MINOR_STREAM_SHARE * busy]
        for place, (stream, figures) in enumerate(major):
            lines.append(f"  stream {stream:>4}: busy {figures['busy_ms']:9.1f} ms, "
                         f"{figures['activities']:6d} kernels / copies")
            if place < STREAMS_WITH_KERNELS:
                lines.extend(f"      {k['ms']:8.2f} ms {k['calls']:6d} x  {k['name'][:100]}"
                             for k in figures.get("kernels", []))
        minor = ranked[len(major):]
        if minor:
            lines.append(f"  {len(minor)} more streams, each under "
                         f"{100 * MINOR_STREAM_SHARE:.0f}% of the busy time: busy "
                         f"{sum(f['busy_ms'] for _, f in minor):.1f} ms together, "
                         f"{sum(f['activities'] for _, f in minor)} kernels / copies")
    for title, key in (("host calls waiting for the device", "blocking"),
                       ("host calls launching device work", "launches")):
        calls = summary[key]
        lines.append(f"{title}: " + (", ".join(
            f"{name} {v['calls']} x, {v['ms']:.1f} ms" for name, v in sorted(calls.items()))
            or "none"))
    return "\n".join(lines) + "\n"
