"""The click commands of `tcore`, one module per command group (wired in `tcore.cli`)."""
import os

import click


def shard_paths(ctx, param, values) -> list[str]:
    """`--data` callback: the option repeated and/or comma-separated, as one list of paths
    (the same for every command, so `--data A --data B` never silently keeps only B)."""
    paths = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    for path in paths:
        if not os.path.exists(path):
            raise click.BadParameter(f"{path}: no such file or directory")
    return paths
