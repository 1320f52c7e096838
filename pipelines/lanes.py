"""Stage B as several independent DALI pipelines ("lanes") fed round-robin, on the CPU.

Why: DALI's CPU executor runs one operator at a time, splitting the batch across its
threads, and waits for the slowest sample before the next operator. With per-sample work as
uneven as ours (blur, solarize and jitter only on the views that drew them, clips decoded to
different depths) 2 threads kept only ~1.65 cores busy. Lanes of one thread each never wait
for each other: batch k goes to lane k mod L, so the batches still come out in order, and the
CPU stays busy (stage B alone: ~1.98 of 2 cores, +28% batches/s; the whole loader +16%;
docs/PERFORMANCE.md).

`ViewLanes` speaks the part of DALI's Pipeline protocol the loader uses (`feed_names`,
`feed_input`, `schedule_run`, `outputs`) and behaves like one pipeline of prefetch depth
L x d when each of its L lanes was built with depth d (the caller feeds L x d batches first):
its first `schedule_run` starts every lane (each runs its own d iterations, as a DALI
pipeline does on its first call), and each later call runs one more iteration on the next
lane. Stage B is a pure function of what it is fed, so the
number of lanes never changes a batch.
"""
from __future__ import annotations

from collections import defaultdict


class ViewLanes:
    def __init__(self, lanes: list):
        if not lanes:
            raise ValueError("ViewLanes needs at least one pipeline")
        self.lanes = lanes
        self.feed_names = lanes[0].feed_names
        self._fed = defaultdict(int)       # per input name: batches fed so far
        self._scheduled = 0                # schedule_run calls after the first
        self._started = False
        self._read = 0                     # outputs() calls so far

    def _lane(self, count: int):
        return self.lanes[count % len(self.lanes)]

    def feed_input(self, name: str, data) -> None:
        self._lane(self._fed[name]).feed_input(name, data)
        self._fed[name] += 1

    def schedule_run(self) -> None:
        if not self._started:
            self._started = True
            for lane in self.lanes:
                lane.schedule_run()
            return
        self._lane(self._scheduled).schedule_run()
        self._scheduled += 1

    def outputs(self):
        lane = self._lane(self._read)
        self._read += 1
        return lane.outputs()
