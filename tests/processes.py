"""Helpers for tests that drive real processes: their children, a free port for torchrun,
two gloo ranks running a script, and a guarantee that nothing a test started outlives it."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
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


def run_two_ranks(code: str, tmp_path) -> list[dict]:
    """Runs `code` as ranks 0 and 1 (argv[1]: the JSON file it writes); returns both JSONs.
    A rank that fails or hangs takes the other down with it, so no process is left behind."""
    port = str(free_port())
    children = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)   # PYTHONPATH passed through
        children.append(subprocess.Popen([sys.executable, "-c", code,
                                          str(tmp_path / f"rank{rank}.json")], env=env))
    try:
        assert [child.wait(timeout=120) for child in children] == [0, 0]
    finally:
        for child in children:
            child.kill()
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
