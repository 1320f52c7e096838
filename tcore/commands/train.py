"""`tcore train`: parse options, load the config, call `tcore.train.train`."""
import signal
import sys

import click

from tcore.commands import shard_paths


@click.command(name="train", context_settings={"ignore_unknown_options": False})
@click.option("--config", "config", default="tiny_cpu", show_default=True,
              help="Preset name (tiny_cpu, vits16_k400, vitb16_k400, vits16_imagenet) or YAML path.")
@click.option("--data", required=True, multiple=True, callback=shard_paths,
              help="Shard directory or manifest.json; several: repeat --data or separate "
                   "them with commas.")
@click.option("--output", required=True, help="Run directory (config, checkpoints, logs).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output.")
@click.option("--max-steps", type=int, default=None,
              help="Stop at this step of the run, counted from its start, also with "
                   "--resume (schedules keep the configured length).")
@click.option("--checkpoint-every", type=int, default=None,
              help="Steps between checkpoints (overrides train.checkpoint_every).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still written).")
@click.option("--dry-run", is_flag=True,
              help="Print what the run would do (global batch, steps, passes over the data, "
                   "lr after scaling, where it starts) and stop; writes nothing and needs no "
                   "GPU.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="With --dry-run: the number of processes to plan for (default: "
                   "WORLD_SIZE as torchrun sets it, else 1).")
@click.argument("overrides", nargs=-1)
def train(config, data, output, resume, max_steps, checkpoint_every, no_progress, dry_run,
          world_size, overrides):
    """Train T-CoRe. OVERRIDES are key=value config entries, e.g. optim.epochs=10."""
    from tcore.checkpoint import CheckpointError
    from tcore.config import ConfigError, load_config
    from tcore.distributed import DistributedSetupError, env_world_size
    from tcore.metrics_log import NonFiniteLossError
    from tcore.pipelines.stage_a import BadSampleError
    from tcore.preprocess.errors import ShardDirError
    from tcore.train import dry_run as plan_run
    from tcore.train import train as run_train

    if world_size is not None and not dry_run:
        raise click.UsageError("--world-size plans a run: give it with --dry-run (torchrun "
                               "sets a real run's)")
    try:
        cfg = load_config(config, list(overrides))
        if dry_run:
            for line in plan_run(cfg, data, output, resume=resume, max_steps=max_steps,
                                 checkpoint_every=checkpoint_every,
                                 world_size=world_size or env_world_size()):
                click.echo(line if line.startswith("tcore train") else f"  {line}")
            return
        result = run_train(cfg, data, output, resume=resume, max_steps=max_steps,
                           checkpoint_every=checkpoint_every, progress=not no_progress)
    # Errors whose message names the file, shard, sample or key at fault (ShardDirError: a
    # bad manifest and the loader's start-up checks); anything else keeps its traceback.
    except (ConfigError, ShardDirError, BadSampleError, CheckpointError, FileNotFoundError,
            FileExistsError, DistributedSetupError) as exc:
        raise click.ClickException(str(exc)) from exc
    except NonFiniteLossError:
        sys.exit(3)  # the message was printed by the loop
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C, as a shell reports it; the loop said where to resume
    if result.stopped_by:   # every rank exits alike, as killed by that signal would
        if result.is_main:
            click.echo(f"tcore train: stopped by {result.stopped_by} after step "
                       f"{result.end_step}; checkpoint {result.last_checkpoint}; continue with "
                       "--resume", err=True)
        sys.exit(128 + signal.Signals[result.stopped_by].value)
    if not result.is_main:
        return
    if result.end_step > result.start_step:
        click.echo(f"trained steps {result.start_step + 1}..{result.end_step}; "
                   f"run directory: {result.run_dir}")
        click.echo(f"  checkpoint: {result.last_checkpoint}")
        click.echo(f"  teacher backbone: {result.teacher_export}")
        click.echo(f"  metrics: {result.metrics}")
    else:
        past = ("" if not max_steps or max_steps > result.end_step
                else f", at --max-steps {max_steps}" if max_steps == result.end_step
                else f", past --max-steps {max_steps}")
        click.echo(f"nothing to train: {result.run_dir} is at step {result.end_step} already"
                   f"{past}")
    if max_steps and max_steps > result.end_step:
        click.echo(f"  note: the schedule ends at step {result.end_step} (optim.epochs x "
                   f"optim.official_epoch_length), before --max-steps {max_steps}")
