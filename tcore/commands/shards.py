"""`tcore shards` commands (placeholder until its module lands)."""
import click


@click.group(name="shards")
def shards():
    """Not built yet."""
