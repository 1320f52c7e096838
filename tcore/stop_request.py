"""Stopping a training run cleanly when the cluster asks for it.

A batch scheduler ends a job by sending SIGTERM to its processes (SLURM at the time limit or
on preemption, a grace period before SIGKILL), or an earlier signal it was told to send
(`sbatch --signal=USR1@120`). Killed then, the run would lose every step since its last
checkpoint (1000 by default). `StopRequest` turns either signal into a request instead: the
training loop checks it at its next sync point (a log or checkpoint step, where the host
reads the losses back anyway), writes a checkpoint there and ends, so a `--resume` loses
nothing. All ranks stop at the same step: a request on any rank stops every rank.
torchrun forwards a SIGTERM it receives to its workers (then SIGKILLs them 30 s later); a
SIGUSR1 only when started with it among `--signals-to-handle` (otherwise it ends torchrun).
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop signal received by this process, if any (its number, 0 for none)."""

    def __init__(self):
        self.signal_number = 0

    def _handle(self, signum, _frame) -> None:
        # Every signal only asks, the repeats included: under a scheduler a worker gets the
        # job's SIGTERM and torchrun's forwarded copy. What is stuck, the scheduler's (or
        # torchrun's) SIGKILL after its grace period ends.
        self.signal_number = signum

    @contextlib.contextmanager
    def listening(self):
        """While the block runs, STOP_SIGNALS set the request instead of ending the process
        (main thread only: where Python can install handlers). After the block the previous
        handlers come back, unless a stop was requested: the process is then ending (the CLI
        exits 128+n) and STOP_SIGNALS stay ignored, so a repeat (torchrun's forwarded copy)
        cannot kill it before it says where to resume. Ignored rather than handled, as Python
        puts the default back for its own handlers while the interpreter ends; an ending that
        hangs is left to the scheduler's SIGKILL."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_IGN if self.signal_number else handler)

    def agreed(self, info) -> str | None:
        """At a sync point, on every rank (collective): the name of the signal that stops
        the run, if any rank received one, else None."""
        number = torch.tensor([self.signal_number], device=info.device)
        if info.enabled:
            dist.all_reduce(number, op=dist.ReduceOp.MAX)
        number = int(number.item())
        return signal.Signals(number).name if number else None
