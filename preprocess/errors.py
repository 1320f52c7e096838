"""Errors of the shard builder."""


class BadInput(Exception):
    """An input file that cannot become a sample; the message says why, for failures.jsonl."""


class ShardDirError(Exception):
    """A shard directory or manifest that cannot be used (wrong options, invalid manifest)."""
