"""`tcore pipeline` commands (placeholder until its module lands)."""
import click


@click.group(name="pipeline")
def pipeline():
    """Not built yet."""
