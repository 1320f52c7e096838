"""Where stage A runs: a thread of the loader's process, or a process of its own.

Stage A is mostly Python (unpacking DALI's reader outputs, then ~0.2 ms of draws per sample,
~30 ms a batch of 64 on a slow core). In a thread it shares the GIL with the training loop,
which on a GPU is Python launching kernels: every millisecond stage A holds the GIL is one
the step's launches wait. In a process of its own it has its own interpreter; its batches
come back pickled through a pipe (a batch of 64 raw JPEG-frame samples is ~13 MB, ~2.5 ms
to unpickle). `PipelineConfig.producer` chooses.

Both producers give the same sequence from `get()`: HostBatch after HostBatch, then None
once a one-pass epoch is drawn (again for every later call), or the exception stage A
raised (a BadSampleError names the shard and sample), which the loader re-raises.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback

from tcore.pipelines.stage_a import StageA, StageASpec

_POLL_S = 0.1
_CLOSE_TIMEOUT_S = 10.0


def _put_until_stopped(out, item, stopping) -> bool:
    """Put `item` once there is room, unless asked to stop first."""
    while not stopping():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _run(spec: StageASpec, put, stopping) -> None:
    """Stage A's loop: batches until stopped or (one pass) exhausted, then None; an error
    is put in place of a batch and ends the loop."""
    try:
        stage = StageA(spec)
        while not stopping():
            if stage.exhausted():
                put(None)
                return
            put(stage.next_batch())
    except BaseException as error:  # handed to the consumer, raised there
        put(error)


class ThreadProducer:
    """Stage A in a thread of this process."""

    def __init__(self, spec: StageASpec, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False

        def put(item):
            _put_until_stopped(self._queue, item, self._stop.is_set)

        self._thread = threading.Thread(target=_run, args=(spec, put, self._stop.is_set),
                                        name="tcore-stage-a", daemon=True)
        self._thread.start()

    def get(self):
        if self._done:
            return None
        item = self._queue.get()
        self._done = item is None
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _picklable(item):
    """Exceptions cross the pipe pickled; one that does not pickle (an extension's error
    type, say) goes as a RuntimeError with its type, message and the child's traceback."""
    if not isinstance(item, BaseException):
        return item
    try:
        pickle.dumps(item)
        return item
    except Exception:
        trace = "".join(traceback.format_exception(item))
        return RuntimeError(f"stage A failed in its process: {type(item).__name__}: {item}\n"
                            f"{trace}")


_HEADER = 8   # bytes of a frame's length, little-endian


def _write_frame(out, item) -> None:
    payload = pickle.dumps(_picklable(item), protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(payload).to_bytes(_HEADER, "little"))
    out.write(payload)
    out.flush()


def _read_frame(source):
    """The next item from the pipe; raises EOFError when the child has closed it."""
    header = source.read(_HEADER)
    if len(header) < _HEADER:
        raise EOFError
    size = int.from_bytes(header, "little")
    payload = source.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)


def _child_main(argv: list[str]) -> None:
    """The producer process (`python -m tcore.pipelines.producer FD`): the spec arrives
    pickled on stdin, the batches leave as length-prefixed pickles on pipe FD. A full pipe
    is the back-pressure; a parent that is gone makes the next write fail, which ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    spec = pickle.load(sys.stdin.buffer)
    with os.fdopen(int(argv[0]), "wb") as out:
        try:
            _run(spec, lambda item: _write_frame(out, item), lambda: False)
        except BrokenPipeError:
            pass   # the parent closed its end: nothing left to do


class ProcessProducer:
    """Stage A in a process of its own: a fresh interpreter (`subprocess`), not a fork (the
    parent may hold CUDA and threads) and not multiprocessing's spawn (which re-runs the
    parent's main script, and a script without a __main__ guard would start training again
    in the child). A thread here reads the pipe into a bounded queue."""

    def __init__(self, spec: StageASpec, depth: int):
        read_fd, write_fd = os.pipe()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(write_fd)], stdin=subprocess.PIPE,
                pass_fds=(write_fd,), close_fds=True)
        finally:
            os.close(write_fd)    # the child's end; EOF here once the child is gone
        self._source = os.fdopen(read_fd, "rb")
        self._reader = threading.Thread(target=self._read_pipe, name="tcore-stage-a-pipe",
                                        daemon=True)
        self._reader.start()
        try:
            pickle.dump(spec, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.close()
        except BrokenPipeError:
            pass   # the child died at start-up: get() reports its exit code

    def _read_pipe(self) -> None:
        while not self._stop.is_set():
            try:
                item = _read_frame(self._source)
            except (EOFError, OSError, ValueError):
                item = _ENDED
            if not _put_until_stopped(self._queue, item, self._stop.is_set) or item is _ENDED:
                return

    def get(self):
        if self._done:
            return None
        item = self._queue.get()
        if item is _ENDED:
            code = self._process.wait()
            raise RuntimeError(
                f"the loader's stage A process (pid {self._process.pid}) exited with code "
                f"{code} before handing over a batch or an error (killed for memory?); "
                "data.pipeline.producer=thread runs stage A in-process")
        self._done = item is None
        return item

    def close(self) -> None:
        self._stop.set()
        if self._process.poll() is None:
            self._process.terminate()
        try:
            self._process.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        while self._reader.is_alive():       # it may be waiting for room in the queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._reader.join()
        self._source.close()


_ENDED = "stage A's pipe closed"   # a str sentinel: survives identity checks, never a batch


def start_producer(kind: str, spec: StageASpec, depth: int):
    """A running producer: "thread" or "process" (PipelineConfig.resolved_producer)."""
    if kind == "process":
        return ProcessProducer(spec, depth)
    if kind == "thread":
        return ThreadProducer(spec, depth)
    raise ValueError(f"producer = {kind!r}: must be 'thread' or 'process'")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
