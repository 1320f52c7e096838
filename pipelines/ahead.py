"""Batches made ahead of `next()` in a thread of the loader (`PipelineConfig.assemble_ahead`).

Why: on a GPU the loader's `next()` does host work in the training thread: it waits for
stage B, copies the views out of DALI's buffers, replays the colour stage, uploads masks and
labels, and feeds stage B the next batch. On an H200 that was 22 ms of each 107 ms step of
the compiled ViT-S/16 train step (docs/PERFORMANCE.md, "The second H200 run"), time in which
the training thread launched nothing. In a thread of its own that work can overlap the
step's launches: most of it is spent in C++ (DALI, torch's dispatcher, CUDA calls) that
releases the GIL. Whether it does on a given machine is for `tcore bench train` to say.

How: `AheadThread(produce, depth)` runs `produce(put, stopping)` in a daemon thread, and
`get()` hands out what it `put`, in order. The thread makes at most `depth` items that
`get()` has not taken, the one in the making included: it waits for room before it starts
one (at its start and at the end of each `put`), so with depth 1 it makes the next batch
while the caller's step runs on the last, and then waits. When `produce` raises, `get()`
raises that error after the items put before it; when it returns, `get()` raises
StopIteration. `close()` asks it to stop: waiting for room, and anything that polls
`stopping()`, then raise `Stopped` inside the thread, which ends it quietly.
"""
from __future__ import annotations

import queue
import sys
import threading

import torch

_POLL_S = 0.05


class Stopped(Exception):
    """The thread making batches was asked to stop (raised inside it, never to a caller)."""


class _Raised:
    """What ended `produce`: an error to raise in the caller (StopIteration: it returned)."""

    def __init__(self, error: BaseException):
        self.error = error


class AheadThread:
    """`produce(put, stopping)` run in a thread, at most `depth` items ahead of `get()`."""

    def __init__(self, produce, depth: int, name: str, device: torch.device | None = None):
        if depth < 1:
            raise ValueError(f"depth = {depth}: a thread ahead needs room for one item")
        self._produce = produce
        self._device = device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Semaphore(depth)    # items the thread may make before a get()
        self._stop = threading.Event()
        self._ended: _Raised | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def put(self, item) -> None:
        """Hand `item` over, then wait for room to make the next; raises Stopped if asked
        to stop first."""
        self._queue.put(item)
        self._wait_for_room()

    def get(self):
        """The next item, in the order put; raises what ended the thread once they are out."""
        if self._ended is not None:
            raise self._ended.error
        item = self._queue.get()
        self._room.release()
        if isinstance(item, _Raised):
            self._ended = item
            self._thread.join()
            raise item.error
        return item

    def _wait_for_room(self) -> None:
        while not self._room.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                raise Stopped
        if self._stop.is_set():
            raise Stopped

    def close(self) -> None:
        """Stop the thread and wait for it; items not taken are dropped. Called from the
        thread itself (a loader dropped there, its finaliser closing it) or at interpreter
        exit: only the stop."""
        self._stop.set()
        if threading.current_thread() is self._thread or sys.is_finalizing():
            # At interpreter exit a daemon thread may never run again: waiting would hang.
            return
        self._thread.join()

    def _run(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                # The current device is per thread: this one's would otherwise be device 0.
                torch.cuda.set_device(self._device)
            self._wait_for_room()
            self._produce(self.put, self.stopping)
            ended = _Raised(StopIteration())
        except Stopped:
            return
        except BaseException as error:   # raised in the caller by get()
            ended = _Raised(error)
        self._queue.put(ended)
