"""`tcore eval` commands (placeholder until its module lands)."""
import click


@click.group(name="eval")
def eval_group():
    """Not built yet."""
