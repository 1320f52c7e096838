"""Errors of the shard builder."""
import os


class BadInput(Exception):
    """An input file that cannot become a sample; the message says why, for failures.jsonl."""


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
