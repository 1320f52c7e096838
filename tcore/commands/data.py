"""`tcore data` commands (placeholder until its module lands)."""
import click


@click.group(name="data")
def data():
    """Not built yet."""
