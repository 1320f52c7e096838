"""Where stage A runs: a thread of the loader's process, or a process of its own.

Stage A is mostly Python (unpacking DALI's reader outputs, then the draws and masks: 16-19
ms a batch of 64 over a reader, 10-11 ms for a set held in memory, on one core of the
2-core development machine, `tcore bench data --loader stage-a`). In a thread it shares
the GIL with the training loop, which on a GPU is Python launching kernels: every millisecond stage
A holds the GIL is one the step's launches wait. In a process of its own it has its own
interpreter; its batches come back pickled through a pipe (64 JPEG-frame samples cut to
their drawn frames are ~2 MB, ~1 ms to unpickle). `PipelineConfig.producer` chooses.

Both producers give the same sequence from `get()`: HostBatch after HostBatch, then None
once a one-pass epoch is drawn (again for every later call). A failure is raised: the
exception stage A raised (a BadSampleError names the shard and sample), or for a process
one that died or sent what cannot be read; and raised again on every later call, so nothing
ever waits for a stage A that has stopped.
"""
from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback

from tcore.pipelines.ahead import Stopped
from tcore.pipelines.stage_a import BadSampleError, StageA, StageASpec

_POLL_S = 0.1


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


class _QueuedProducer:
    """What both producers share: a bounded queue of stage A's items and `get()`'s rules."""

    def __init__(self, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._done = False

    def get(self, stopping=None):
        """The next item; `stopping()` (a thread making batches ahead, `ahead.py`) is
        polled while none is there, and raises Stopped once it says so."""
        if self._failure is not None:
            raise self._failure
        if self._done:
            return None
        item = self._wait_for_item(stopping)
        if item is _ENDED:
            item = self._ended()
        if isinstance(item, BaseException):
            self._failure = item
            raise item
        self._done = item is None
        return item

    def _wait_for_item(self, stopping):
        if stopping is None:
            return self._queue.get()
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if stopping():
                    raise Stopped from None

    def _ended(self) -> BaseException:
        """The error for a stage A that stopped without a word (only a process can)."""
        return RuntimeError("stage A stopped without handing over a batch")

    def _drain_while(self, running) -> None:
        """Take items while `running()`: a thread blocked on the full queue needs room to
        see the stop."""
        while running():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass


class ThreadProducer(_QueuedProducer):
    """Stage A in a thread of this process."""

    def __init__(self, spec: StageASpec, depth: int):
        super().__init__(depth)

        def put(item):
            _put_until_stopped(self._queue, item, self._stop.is_set)

        self._thread = threading.Thread(target=_run, args=(spec, put, self._stop.is_set),
                                        name="tcore-stage-a", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._drain_while(self._thread.is_alive)
        self._thread.join()


def _picklable(item):
    """What crosses the pipe. An exception carries the child's traceback as a note (the
    parent's own stack says nothing about where stage A failed); one that does not survive
    a pickle round trip (an extension's error type, a custom __init__) goes as a
    RuntimeError with its type, message and traceback."""
    if not isinstance(item, BaseException):
        return item
    trace = "".join(traceback.format_exception(item))
    try:
        pickle.loads(pickle.dumps(item))
    except Exception:
        return RuntimeError(f"stage A failed in its process: {type(item).__name__}: {item}\n"
                            f"{trace}")
    if not isinstance(item, BadSampleError):     # whose message already names the sample
        item.add_note(f"in the stage A process:\n{trace}")
    return item


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


def _child_main(write_fd: int) -> None:
    """The producer process: the spec arrives pickled on stdin, the batches leave as
    length-prefixed pickles on pipe `write_fd`. A full pipe is the back-pressure; a parent
    that is gone makes the next write fail, which ends it quietly. A batch scheduler's stop
    signals (SIGTERM, SIGUSR1: tcore.stop_request) reach every process of a job: ignored
    here, so that stage A keeps feeding the training loop to the checkpoint it stops at;
    the parent ends this process with SIGKILL."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    out = os.fdopen(write_fd, "wb")
    try:
        spec = pickle.load(sys.stdin.buffer)
        _run(spec, lambda item: _write_frame(out, item), lambda: False)
        out.flush()
    except BrokenPipeError:
        os._exit(0)   # no reader left: exit without flushing into the closed pipe


# The child's command: the parent's import path, set before anything of tcore is imported,
# so the child runs the very tcore the parent does (`python -m` would put the working
# directory first, where a source checkout's own `tcore/` may shadow the installed one).
_CHILD_CODE = ("import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
               "from tcore.pipelines.producer import _child_main; _child_main(int(sys.argv[1]))")


class ProcessProducer(_QueuedProducer):
    """Stage A in a process of its own: a fresh interpreter (`subprocess`), not a fork (the
    parent may hold CUDA and threads) and not multiprocessing's spawn (which re-runs the
    parent's main script, and a script without a __main__ guard would start training again
    in the child). It runs in a session of its own, so a Ctrl-C in the terminal goes to the
    parent alone, which then closes it. A thread here reads the pipe into a bounded queue."""

    def __init__(self, spec: StageASpec, depth: int):
        super().__init__(depth)
        self._process = self._reader = self._source = None
        try:
            self._start(spec)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: StageASpec) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self._source = os.fdopen(read_fd, "rb")
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-c", _CHILD_CODE, str(write_fd), json.dumps(sys.path)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), close_fds=True,
                start_new_session=True)
        finally:
            os.close(write_fd)    # the child's end; EOF here once the child is gone
        self._reader = threading.Thread(target=self._read_pipe, name="tcore-stage-a-pipe",
                                        daemon=True)
        self._reader.start()
        try:
            pickle.dump(spec, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        except BrokenPipeError:
            pass   # the child died at start-up: get() reports its exit code
        finally:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass

    def _read_pipe(self) -> None:
        while not self._stop.is_set():
            try:
                item = _read_frame(self._source)
            except (EOFError, OSError):
                item = _ENDED
            except BaseException as error:    # a frame that does not unpickle here
                item = RuntimeError(f"a batch from the stage A process could not be read: "
                                    f"{type(error).__name__}: {error}")
            if not _put_until_stopped(self._queue, item, self._stop.is_set):
                return
            if item is _ENDED or isinstance(item, BaseException):
                return

    def _ended(self) -> BaseException:
        code = self._process.wait()
        cause = ("killed by signal %d (out of memory?)" % -code if code < 0
                 else "exited with code %d (its error is on stderr above)" % code)
        return RuntimeError(
            f"the loader's stage A process (pid {self._process.pid}) {cause} before "
            "handing over a batch; data.pipeline.producer=thread runs stage A in-process")

    def close(self) -> None:
        self._stop.set()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()    # it ignores SIGTERM (_child_main); it holds no state
            self._process.wait()
        if self._reader is not None:
            self._drain_while(self._reader.is_alive)
            self._reader.join()
        if self._source is not None:
            self._source.close()


_ENDED = "stage A's pipe closed"   # a str sentinel: survives identity checks, never a batch


def start_producer(kind: str, spec: StageASpec, depth: int):
    """A running producer: "thread" or "process" (PipelineConfig.resolved_producer)."""
    if kind == "process":
        return ProcessProducer(spec, depth)
    if kind == "thread":
        return ThreadProducer(spec, depth)
    raise ValueError(f"producer = {kind!r}: must be 'thread' or 'process'")

