"""One writer at a time: an exclusive lock on a file in the directory being written.

Two processes writing one directory (a training job launched twice, a requeued job whose
first copy still runs, a shard build rerun "to resume" while the first is still going)
would overwrite each other's files, and each one's start-up removes the other's
temporaries. The writer therefore holds an exclusive `flock` on a lock file for as long as
it writes. The kernel drops it when the holder ends in any way, kill -9 included, so a
crashed run never blocks its own resumption. On a file system without locks the work goes
on unlocked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from tcore.preprocess.files import OutputWriteError


# Who holds a lock whose file names nobody: holders of a shared lock, or an exclusive holder
# in the instant before it writes its pid.
UNNAMED_HOLDER = "processes that share the lock"


class DirectoryBusy(FileExistsError):
    """Another live process holds the lock: it is writing the same directory."""


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, busy: Callable[[str], str], *,
                   shared: bool = False):
    """Hold `lock_file`'s lock while the block runs (the file records who holds it). When
    another process holds it, raise DirectoryBusy(busy(holder)), `holder` being its
    "pid N on HOST"; where the OS refuses to make it (a read-only or forbidden directory),
    an OutputWriteError naming the path. `shared`: a lock many holders share, which keeps
    out only an exclusive one (and records no holder: there may be several)."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a+")
    except OSError as error:   # read-only, no permission: the directory cannot be written
        raise OutputWriteError(f"{error.filename or lock_file}: cannot write: "
                               f"{error.strerror or error}") from error
    with handle:
        locked = _lock(handle, busy, shared)
        if locked and not shared:
            _say(handle, f"pid {os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            if locked and not shared:   # emptied, not removed: that races with its next user
                _say(handle, "")


def _dead_here(holder: str) -> bool:
    """Whether `holder` ("pid N on HOST") names a process of this host that is gone: a
    holder killed -9 leaves its line, and the lock is now held by others."""
    words = holder.split()
    if len(words) != 4 or words[0] != "pid" or words[2] != "on" or not words[1].isdigit():
        return False
    return words[3] == socket.gethostname() and not process_alive(int(words[1]))


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def _say(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def _lock(handle, busy: Callable[[str], str], shared: bool = False) -> bool:
    """Take the lock; False where the file system has none."""
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        if not holder or _dead_here(holder):   # shared holders, or a pid a kill -9 left
            holder = UNNAMED_HOLDER
        raise DirectoryBusy(busy(holder)) from None
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
