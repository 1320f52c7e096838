"""`tcore data synth`: the built-in synthetic dataset."""
import click

from tcore.preprocess.synth import make_synthetic


@click.group(name="data")
def data():
    """Datasets: `tcore data synth OUT` writes the built-in synthetic one."""


@data.command(name="synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--videos", default=24, show_default=True, help="Training videos (4 motion classes).")
@click.option("--frames", default=48, show_default=True, help="Frames per training video.")
@click.option("--size", default="160x128", show_default=True, help="Training video size WxH.")
@click.option("--davis-videos", default=3, show_default=True, help="Held-out videos in DAVIS-2017 layout.")
@click.option("--davis-frames", default=16, show_default=True)
@click.option("--davis-size", default="160x96", show_default=True)
def synth(out, seed, videos, frames, size, davis_videos, davis_frames, davis_size):
    """Write procedurally generated videos to OUT/train/<class>/ and OUT/davis/."""
    try:
        summary = make_synthetic(out, seed=seed, videos=videos, frames=frames, size=size,
                                 davis_videos=davis_videos, davis_frames=davis_frames, davis_size=davis_size)
    except (ValueError, ModuleNotFoundError) as err:
        raise click.ClickException(str(err))
    click.echo(f"{summary['train_dir']}: {len(summary['videos'])} videos in {len(summary['classes'])} classes; "
               f"{summary['davis_dir']}: {len(summary['davis_videos'])} DAVIS-layout videos")
