"""`tcore data synth`: the built-in synthetic dataset."""
import click

from tcore.commands.shards import _os_error
from tcore.preprocess.synth import make_synthetic, parse_size


class SizeType(click.ParamType):
    """WxH (e.g. 160x128) as (width, height); click names the option when it is wrong."""
    name = "WxH"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group(name="data")
def data():
    """Datasets: `tcore data synth OUT` writes the built-in synthetic one."""


@data.command(name="synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the output is byte-identical for a given seed.")
@click.option("--videos", type=click.IntRange(min=0), default=24, show_default=True,
              help="Training videos (4 motion classes).")
@click.option("--frames", type=click.IntRange(min=1), default=48, show_default=True,
              help="Frames per training video.")
@click.option("--size", type=SizeType(), default="160x128", show_default=True,
              help="Training video size WxH (at least 16x16).")
@click.option("--davis-videos", type=click.IntRange(min=0), default=3, show_default=True,
              help="Held-out videos in DAVIS-2017 layout.")
@click.option("--davis-frames", type=click.IntRange(min=3), default=16, show_default=True,
              help="Frames per held-out DAVIS-layout video (at least 3: `tcore eval davis` "
                   "scores the frames between the first and the last).")
@click.option("--davis-size", type=SizeType(), default="160x96", show_default=True,
              help="Held-out video size WxH (at least 16x16).")
def synth(out, seed, videos, frames, size, davis_videos, davis_frames, davis_size):
    """Write procedurally generated videos to OUT/train/<class>/ and OUT/davis/."""
    if videos == 0 and davis_videos == 0:
        raise click.UsageError("--videos and --davis-videos are both 0: nothing would be written")
    try:
        summary = make_synthetic(out, seed=seed, videos=videos, frames=frames, size=size,
                                 davis_videos=davis_videos, davis_frames=davis_frames, davis_size=davis_size)
    except (ValueError, ModuleNotFoundError) as err:
        raise click.ClickException(str(err))
    except OSError as err:  # OUT not creatable, no permission, disk full
        raise click.ClickException(_os_error(err))
    parts = []
    if videos:
        parts.append(f"{summary['train_dir']}: {len(summary['videos'])} videos in "
                     f"{len(summary['classes'])} classes")
    if davis_videos:
        parts.append(f"{summary['davis_dir']}: {len(summary['davis_videos'])} DAVIS-layout videos")
    reused = " (already there, made with these options: reused as is)" if summary["reused"] else ""
    click.echo("; ".join(parts) + reused)
