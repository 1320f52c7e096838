"""`tcore train` (placeholder until its module lands)."""
import click


@click.command(name="train")
def train():
    """Not built yet."""
