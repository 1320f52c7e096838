"""The `tcore` command line: thin click groups that parse options and call into modules.

Every command lives in `tcore/commands/<group>.py`; none of them holds logic of its own.
"""
import warnings

import click

from tcore.commands.bench import bench
from tcore.commands.data import data
from tcore.commands.demo import demo
from tcore.commands.eval import eval_group
from tcore.commands.pipeline import pipeline
from tcore.commands.shards import shards
from tcore.commands.train import train
from tcore.preprocess.errors import TcoreWarning
from tcore.preprocess.files import OutputWriteError

_python_format_warning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """tcore's own warnings as one line for the user (they name the file or setting
    concerned); any other warning as Python formats it, with its source line."""
    if issubclass(category, TcoreWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class TcoreGroup(click.Group):
    """Every command: an output the OS refused to write (disk full, no permission) ends in
    one line naming the file, whichever command was writing it; tcore's warnings print as
    one line each."""

    def invoke(self, ctx):
        warnings.formatwarning = format_warning
        try:
            return super().invoke(ctx)
        except OutputWriteError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=TcoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tcore")
def main():
    """tcore: train T-CoRe video representations fast.

    Data flows one way: `tcore data synth` / your videos -> `tcore shards build` ->
    `tcore train` (DALI pipeline + model) -> `tcore eval`. `tcore bench` measures throughput.
    """


for command in (shards, data, pipeline, train, eval_group, bench, demo):
    main.add_command(command)

if __name__ == "__main__":
    main()
