"""Atomic training checkpoints: `RUN_DIR/checkpoints/checkpoint-<step>.pt`.

A checkpoint is written to a hidden temporary file in the same directory, flushed to disk,
then renamed over its final name, so a crash (or kill -9) mid-write never leaves a partial
file under a checkpoint name: the previous checkpoints stay intact and the next start
removes the stale temporary. Only the newest `keep_last` checkpoints are kept.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from tcore.preprocess.files import write_atomically

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})\.pt$")
TMP_PREFIX = ".tmp-checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or used; the message names the file."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale_temporaries(directory: str | os.PathLike, prefix: str = TMP_PREFIX
                             ) -> list[Path]:
    """Delete temporaries (named `prefix`...) a crashed writer left behind; return them."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in directory.glob(f"{prefix}*"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save under a temporary name, flushed to disk, then renamed into place (an
    OutputWriteError naming `path` when the OS refuses the write)."""
    return write_atomically(path, lambda temporary: save_torch(obj, temporary),
                            prefix=TMP_PREFIX, suffix=".pt", durable=True)


def save_torch(obj, path: str) -> None:
    """torch.save through a Python file: given a path, torch's C++ writer reports a failed
    write (disk full) only as a zip position mismatch; through a file, the OSError stays."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; return the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    existing = list_checkpoints(directory)
    doomed = [path for _, path in existing[:-keep_last]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` as the checkpoint of `step`, then keep only the newest `keep_last`."""
    path = atomic_torch_save({"step": step, **state}, checkpoint_path(directory, step))
    prune_checkpoints(directory, keep_last)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        # Tensors, numbers, strings and containers only: no pickled code runs on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = ("an empty file (0 bytes)" if path.is_file() and path.stat().st_size == 0
                  else str(exc).strip() or type(exc).__name__)
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from exc


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """Every RNG the step may draw from: python, numpy, torch CPU and CUDA.

    Held as tuples, ints and tensors only, so checkpoints load with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
