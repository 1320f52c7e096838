"""`tcore bench` commands (placeholder until its module lands)."""
import click


@click.group(name="bench")
def bench():
    """Not built yet."""
