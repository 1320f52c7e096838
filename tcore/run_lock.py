"""One training process per run directory at a time.

Two runs writing one directory (a job launched twice, a requeued job whose first copy still
runs) would overwrite each other's checkpoints, and the second one's start-up removes the
first one's temporaries. Rank 0 therefore holds an exclusive `flock` on `RUN_DIR/.lock`
for the whole run. The kernel drops it when the holder ends in any way, kill -9 included,
so a crashed run never blocks its own `--resume`. On a file system without locks the run
goes on unlocked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirectoryBusy(FileExistsError):
    """Another live process trains into this run directory."""


@contextlib.contextmanager
def run_directory_lock(run_dir: str | os.PathLike, enabled: bool = True):
    """Hold the run directory's lock while the block runs (creating the directory); raise
    RunDirectoryBusy, naming the holder, when another process holds it."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        if _lock(handle, run_dir):
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        yield


def _lock(handle, run_dir: Path) -> bool:
    """Take the lock; False where the file system has none."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not yet said its pid"
        raise RunDirectoryBusy(
            f"{run_dir}: another tcore train ({holder}) is training into this run directory; "
            "wait for it to end, or choose another --output") from None
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
