"""Writing an output file: under a temporary name, then renamed into place.

Every output of tcore is written under a temporary name and renamed over its final path, so
a crash leaves the old file or the new one (`write_atomically`; the shard builder renames
its tars and indexes itself, as it streams them). A write the OS refuses (disk full, quota,
no permission) is an `OutputWriteError` naming the output, not the temporary nor torch's or
PIL's symptom of it. `tempfile.mkstemp` creates the temporary with mode 0600, which the
rename would keep: on a shared machine nobody else could read a run's checkpoints, configs
or results. `publish` first gives it the mode any newly created file gets under the
process's umask.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


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


class OutputWriteError(OSError):
    """An output the OS refused to write; the message names the file and the reason."""


def os_error_behind(error: BaseException) -> OSError | None:
    """The OSError (disk full, file too large, no permission) that caused `error`, if any:
    torch.save, for one, reports a failed write as a RuntimeError about zip positions, the
    OSError being its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# The longest file name the usual file systems take (ext4, xfs, btrfs, tmpfs, NFS).
NAME_MAX = 255


def check_output_path(path: str | os.PathLike, what: str | None = None, *,
                      named: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work and without creating anything, a path that cannot become an
    output directory: it, or a folder above it, is a file, or the OS will not look it up (a
    name too long). The OS itself says only "Not a directory" or "File exists", without
    which path. `what` begins the message (the option and the user's path, "--output run");
    the path alone by default. A file found elsewhere than `named` (default: `path`), the
    path `what` shows, is named. An OutputWriteError."""
    path = Path(path)
    label = what or str(path)
    named = Path(named) if named is not None else path
    existing, to_make = _parts_to_make(path)
    if any(len(os.fsencode(part)) > _name_max(existing) for part in to_make):
        # Found before any folder above it is made (a lookup below a missing folder does not
        # see it, and mkdir would make the folders above first). Existing folders are the
        # file system's to judge (vfat and exFAT count characters, not bytes).
        raise OutputWriteError(f"{label}: cannot be used: {os.strerror(errno.ENAMETOOLONG)}")
    for folder in (path, *path.parents):
        try:
            is_file = folder.exists() and not folder.is_dir()
        except OSError as error:
            raise OutputWriteError(f"{label}: cannot be used: {error.strerror or error}"
                                   ) from error
        if is_file:
            where = "" if folder == named else f"{folder} "
            raise OutputWriteError(f"{label}: {where}is a file, not a directory")
    return path


def _parts_to_make(path: Path) -> tuple[Path, list[str]]:
    """The nearest folder of `path` that exists, and the names below it (those mkdir would
    make)."""
    missing = []
    for folder in (path, *path.parents):
        try:
            if folder.exists():
                return folder, missing
        except OSError:   # a name too long to look up: one to make
            pass
        missing.append(folder.name)
    return Path("."), missing


def _name_max(folder: Path) -> int:
    """The longest name, in bytes, the file system of `folder` takes (NAME_MAX if unsaid)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def make_output_directory(path: str | os.PathLike, what: str | None = None, *,
                          named: str | os.PathLike | None = None) -> Path:
    """`check_output_path`, then make the directory (and its parents) and a file in it,
    removed at once: an output the OS refuses (read-only, no permission) is found before the
    work (minutes, hours), not when its first file is written. An OutputWriteError naming
    `what` (default: the path) and, when it is another, the folder the OS refused."""
    path = check_output_path(path, what, named=named)
    label = what or str(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tcore-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:   # as check_output_path says it, where a
            # missing folder above the long name kept the lookup from seeing it
            raise OutputWriteError(f"{label}: cannot be used: {error.strerror}") from error
        refused = error.filename
        where = (f"{refused}: " if refused is not None and Path(refused) in path.parents
                 else "")
        raise OutputWriteError(f"{label}: cannot write: {where}{error.strerror or error}"
                               ) from error
    return path


def make_output_file_directory(path: str | os.PathLike, what: str | None = None) -> Path:
    """`make_output_directory` for the folder an output file goes into; `path` itself must
    not be a folder."""
    path = Path(path)
    label = what or str(path)
    make_output_directory(path.parent, label, named=path)
    try:
        is_dir = path.is_dir()
    except OSError as error:     # its own name too long
        raise OutputWriteError(f"{label}: cannot be used: {error.strerror or error}") from error
    if is_dir:
        raise OutputWriteError(f"{label}: is a directory, not a file")
    return path


def _fsync(path) -> None:
    """Flush a file, or a folder's entries (a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_prefix(path: str | os.PathLike) -> str:
    """How `write_atomically` names the temporaries of `path` by default: `.<name>.tmp-`..."""
    return f".{Path(path).name}.tmp-"


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], *,
                     prefix: str | None = None, suffix: str = "",
                     durable: bool = False) -> Path:
    """`write(temporary)` fills a new temporary file beside `path` (named `prefix`...,
    default `temporary_prefix(path)`), which is then renamed over `path`. `durable`: the file
    and the rename are flushed to disk, so a power loss leaves the old file or the new one,
    never an empty one (checkpoints). On any failure the temporary is removed; a failure the OS caused
    is raised as OutputWriteError naming `path`, anything else as it was (a bug stays one)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=prefix or temporary_prefix(path), suffix=suffix,
                                         dir=path.parent)
        os.close(fd)
    except OSError as error:
        # A folder on the way that cannot be made (a file in its place) is named too.
        where = (f"{error.filename}: " if error.filename is not None
                 and Path(error.filename) in path.parents else "")
        raise OutputWriteError(f"{path}: cannot write: {where}{error.strerror or error}"
                               ) from error
    try:
        write(temporary)
        if durable:
            _fsync(temporary)
        publish(temporary, path)
        if durable:
            _fsync(path.parent)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = os_error_behind(error)
        if cause is None or isinstance(error, OutputWriteError):
            raise
        raise OutputWriteError(f"{path}: cannot write: {cause.strerror or cause}") from error
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_atomically` of a text file."""
    return write_atomically(path, lambda temporary: Path(temporary).write_text(text))
