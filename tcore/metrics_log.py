"""Training logs: a progress bar, `metrics.jsonl` (one JSON object per log step) and
TensorBoard scalars, all written by rank 0 only.

The step never syncs with the host except here: per-step loss tensors are kept on the
device in `LossHistory` and only read back at log or checkpoint time, where non-finite
values are found and reported with the step and the loss term they came from.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from tcore.preprocess.files import OutputWriteError, write_text_atomically


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the term."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"non-finite loss at step {step}: {term} = {value}; stopping "
                         f"(the last checkpoint written before it is kept)")
        self.step, self.term, self.value = step, term, value
        self.good_records: list[tuple[int, dict[str, float]]] = []  # steps before it


class LossHistory:
    """Per-step loss dicts kept on the device until the next host sync."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[dict[str, torch.Tensor]] = []

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.losses.append({k: v.detach() for k, v in losses.items()})

    def drain(self, reduce=None) -> list[tuple[int, dict[str, float]]]:
        """Read everything back (one host sync), check it, and clear the buffer.

        `reduce` (e.g. an all-reduce mean over ranks) is applied to the [steps, terms]
        tensor first, so every rank sees the same values and stops at the same step.
        Raises NonFiniteLossError at the first step with a NaN/inf term ("total" is named
        last, so the message points at the term that caused it)."""
        if not self.steps:
            return []
        names = list(self.losses[0].keys())
        stacked = torch.stack([torch.stack([step[n].float() for n in names])
                               for step in self.losses])
        if reduce is not None:
            stacked = reduce(stacked)
        stacked = stacked.cpu()
        out = []
        for step, row in zip(self.steps, stacked.tolist()):
            values = dict(zip(names, row))
            bad = [n for n in names if not math.isfinite(values[n])]
            if bad:
                term = next((n for n in bad if n != "total"), bad[0])
                self.steps, self.losses = [], []
                error = NonFiniteLossError(step, term, values[term])
                error.good_records = out
                raise error
            out.append((step, values))
        self.steps, self.losses = [], []
        return out


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run redoes them); rewrite atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= last_step:
            kept.append(json.dumps(record))
    text = "".join(line + "\n" for line in kept)
    write_text_atomically(path, text)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Progress bar + metrics.jsonl + TensorBoard for rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int, end_step: int,
                 samples_per_step: int, enabled: bool = True, progress: bool = True,
                 tensorboard: bool = True, clock=time.perf_counter):
        self.enabled = enabled
        self.samples_per_step = samples_per_step
        self.start_step, self.end_step = start_step, end_step
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.writer = self.file = None
        self._clock = clock
        self._last_time, self._last_step = clock(), start_step
        self._data_wait = 0.0    # seconds blocked on the loader since the last log
        if not enabled:
            return
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # Events of steps after `start_step` written by an earlier start (a resume
                # from an older checkpoint than the last log) are hidden, as metrics.jsonl
                # is cut back: one value per step.
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                            purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional at runtime
                self.writer = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=end_step, initial=start_step, unit="step",
                            dynamic_ncols=True, desc="train")

    def add_data_wait(self, seconds: float) -> None:
        """Time the training loop just spent blocked in the loader's `next()`."""
        self._data_wait += seconds

    def log(self, records: list[tuple[int, dict[str, float]]], schedule_values: dict,
            skipped_samples: int | None = None) -> None:
        """Write one metrics.jsonl line per step in `records` and update the bar.

        The last record also gets the rate since the previous log, the fraction of that
        wall time spent waiting for data (this rank's; near 0 while the loader keeps ahead,
        as `tcore bench train` measures it) and, when given, the bad samples this rank's
        loader has skipped so far (`skip_bad_samples`)."""
        if not self.enabled or not records:
            return
        now = self._clock()
        last_step = records[-1][0]
        steps_done = max(last_step - self._last_step, 1)
        elapsed = max(now - self._last_time, 1e-9)
        samples_per_s = steps_done * self.samples_per_step / elapsed
        data_wait_fraction = min(self._data_wait / elapsed, 1.0)
        self._last_time, self._last_step, self._data_wait = now, last_step, 0.0
        for step, losses in records:
            record = {"step": step, **{f"loss/{k}": v for k, v in losses.items()}}
            if step == last_step:
                record.update({f"sched/{k}": v for k, v in schedule_values.items()})
                record["samples_per_s"] = samples_per_s
                record["data_wait_fraction"] = data_wait_fraction
                if skipped_samples is not None:
                    record["skipped_samples"] = skipped_samples
            self._append(json.dumps(record) + "\n")
            if self.writer is not None:
                for key, value in record.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, step)
        self._append("", flush=True)
        if self.bar is not None:
            self.bar.update(last_step - self.bar.n)
            self.bar.set_postfix(loss=f"{records[-1][1]['total']:.4f}",
                                 lr=f"{schedule_values['lr']:.2e}",
                                 samples_s=f"{samples_per_s:.1f}",
                                 data_wait=f"{100 * data_wait_fraction:.0f}%", refresh=False)

    def _append(self, text: str, flush: bool = False) -> None:
        """Append to metrics.jsonl; a write the OS refuses (disk full) names the file."""
        try:
            self.file.write(text)
            if flush:
                self.file.flush()
        except OSError as error:
            raise OutputWriteError(f"{self.path}: cannot write: {error.strerror or error}"
                                   ) from error

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            try:
                self.file.close()
            except OSError as error:   # the last buffered lines could not be written
                raise OutputWriteError(f"{self.path}: cannot write: {error.strerror or error}"
                                       ) from error
