"""Helpers for tests that drive real processes: their children, a free port for torchrun,
and a guarantee that nothing a test started outlives it."""
import contextlib
import os
import signal
import socket
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """Child process ids of `pid`, from /proc (the kernel's children lists when it keeps them)."""
    lists = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if lists:
        return [int(c) for f in lists for c in f.read_text().split()]
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def killed_at_the_end(proc):
    """A test's child process, and its own children, never outlive the test."""
    try:
        yield proc
    finally:
        for pid in [*children_of(proc.pid), proc.pid] if proc.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
