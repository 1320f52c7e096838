"""`tcore demo` (placeholder until its module lands)."""
import click


@click.command(name="demo")
@click.option("--output", default="runs/demo", show_default=True)
def demo(output):
    """Not built yet."""
