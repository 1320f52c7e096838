"""`tcore demo`: the main job end to end on built-in synthetic data (CPU is enough)."""
import click

from tcore.commands.shards import _os_error


@click.command(name="demo")
@click.option("--output", default="runs/demo", show_default=True,
              help="Where everything goes: a new or empty directory, or one an earlier "
                   "`tcore demo` made (its results are then replaced).")
@click.option("--steps", type=int, default=None,  # checked by DemoSettings.validate
              help="Training steps (default: the tiny_cpu preset's whole schedule, 300; "
                   "more than 300 trains 300, where its schedules end).")
@click.option("--videos", type=click.IntRange(min=1), default=24, show_default=True,
              help="Synthetic training videos.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the synthetic videos and of the training run.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(output, steps, videos, seed, no_progress):
    """Synthetic videos -> VP9 shards -> a few minutes of CPU training -> loss curve ->
    DAVIS-style label propagation J&F, trained vs random init."""
    from tcore.demo import DemoSettings, run_demo

    try:
        settings = DemoSettings(output=output, steps=steps, videos=videos, seed=seed,
                                progress=not no_progress)
        summary = run_demo(settings, log=click.echo)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # OUTPUT not creatable or writable, disk full
        raise click.ClickException(_os_error(exc)) from exc
    click.echo("\nwritten:")
    for name, path in summary["paths"].items():
        click.echo(f"  {name:17s} {path}")
