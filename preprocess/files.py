"""Putting a finished temporary file in place.

Every output of tcore is written under a temporary name and renamed over its final path, so
a crash leaves the old file or the new one. `tempfile.mkstemp` (and safetensors) create the
temporary with mode 0600, which the rename would keep: on a shared machine nobody else could
read a run's checkpoints, configs or results. `publish` first gives it the mode any newly
created file gets under the process's umask.
"""
from __future__ import annotations

import os


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)   # elsewhere: set and restore it at once
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the temporary `tmp` the default file mode (0666 less the umask), then rename it
    over `path`."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
