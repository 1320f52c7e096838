"""Errors of the shard builder, and the warning class of all tcore."""
import os


class BadInput(Exception):
    """An input file that cannot become a sample; the message says why, for failures.jsonl."""


class TcoreWarning(UserWarning):
    """Something about the user's data or set-up worth a line, not an error: the command
    line prints these as `warning: <message>` (tcore.cli), without Python's source line."""


class ShardDirError(Exception):
    """A shard directory or manifest that cannot be used (wrong options, invalid manifest)."""


def check_nonempty_file(path: str) -> None:
    """Raise BadInput (a readable reason) for a file that cannot be stat-ed or holds 0 bytes."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise BadInput(f"cannot read file: {err.strerror or err}") from err
    if size == 0:
        raise BadInput("empty file (0 bytes)")
