"""`tcore pipeline preview`: a thin wrapper over tcore.pipelines.preview."""
import os

import click

from tcore.commands import check_torch_device, shard_paths
from tcore.pipelines.arguments import MAX_SEED
from tcore.pipelines.config import PipelineConfig
from tcore.preprocess.files import make_output_file_directory


# Up to this many batches the preview runs the torch colour stage eagerly.
EAGER_PREVIEW_BATCHES = 100


def compiles_colour_stage(batches: int, stats) -> bool:
    """Whether the preview compiles the torch colour stage: only when it draws more than
    EAGER_PREVIEW_BATCHES batches (the same pixels either way; below that, compiling costs
    more than it saves: README, "The data pipeline"). Without --stats it draws one."""
    return (batches if stats else 1) > EAGER_PREVIEW_BATCHES


@click.group(name="pipeline")
def pipeline():
    """The DALI data pipeline: look at what the model is fed."""


@pipeline.command(name="preview")
@click.option("--data", "data", multiple=True, required=True, callback=shard_paths,
              help="Shard directory (or manifest.json); several: repeat --data or separate "
                   "them with commas.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="PNG grid of one batch: past | current (masks overlaid) | future, then local crops.")
@click.option("--batches", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batches covered by --stats.")
@click.option("--stats", type=click.Path(dir_okay=False), default=None,
              help="JSON over the batches: frame triples with T, normalised crop boxes, masked counts.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@click.option("--device", default="cpu", show_default=True, callback=check_torch_device,
              help="cpu or cuda[:i] (gpu is cuda).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="DALI threads.")
@click.option("--local-crops", default=8, show_default=True, type=click.IntRange(min=0),
              help="Local crops per sample (0 = none).")
@click.option("--skip-bad-samples", is_flag=True, help="Skip (and count) unreadable samples.")
def preview(data, output, batches, stats, batch_size, seed, device, threads, local_crops,
            skip_bad_samples):
    """Write a PNG of one batch's views (and optional statistics) from shards."""
    import torch

    from tcore.pipelines.config import PipelineConfigError
    from tcore.pipelines.preview import run_preview   # DALI import only when used
    from tcore.pipelines.stage_a import BadSampleError
    from tcore.preprocess.errors import ShardDirError

    on_gpu = torch.device(device).type == "cuda"
    if stats and os.path.realpath(stats) == os.path.realpath(output):
        raise click.BadParameter(f"{stats} is also --output: the statistics would overwrite "
                                 "the picture", param_hint="--stats")
    make_output_file_directory(output, f"--output {output}")
    if stats:
        make_output_file_directory(stats, f"--stats {stats}")
    config = PipelineConfig(skip_bad_samples=skip_bad_samples)
    config.views.n_local = local_crops
    config.photometric_compile = compiles_colour_stage(batches, stats)
    try:
        summary = run_preview(list(data), output, batches=batches, stats=stats,
                              batch_size=batch_size, config=config, seed=seed, device=device,
                              num_threads=threads)
    # The pipeline's own errors name the shard, sample or key; anything else is a bug and
    # keeps its traceback. ShardDirError covers the loader's start-up checks (ShardSetError).
    except (PipelineConfigError, ShardDirError, BadSampleError, FileNotFoundError) as err:
        raise click.ClickException(str(err))
    click.echo(f"{summary['output']}: one batch of {batch_size} samples")
    if summary["stats"]:
        click.echo(f"{summary['stats']}: statistics over {summary['batches']} batches")
    if summary["skipped"]:
        click.echo(f"skipped {summary['skipped']} bad samples")
