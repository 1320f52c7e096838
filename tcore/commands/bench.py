"""`tcore bench` commands: parse options, call `tcore.bench`, print the short table."""
from __future__ import annotations

import traceback

import click

from tcore.preprocess.files import make_output_file_directory

ATTENTION = click.Choice(["auto", "xformers", "sdpa", "math"])
PRECISION = click.Choice(["auto", "bf16", "fp16", "fp32"])
DEVICE = click.Choice(["auto", "cpu", "cuda", "gpu"])
# The backbone presets of tcore.models.vit.ARCHS (a test keeps the two equal): listed here so
# that `tcore --help` does not import torch and timm.
ARCH = click.Choice(["vit_tiny", "vit_small", "vit_base", "vit_large"])
DEVICE_HELP = "auto: the GPU when there is one; gpu is cuda."
PROFILE_COMPARE = "(with --compare: of the first configuration only)"


def overrides_option(function):
    return click.option("--set", "overrides", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="Training-config overrides (as `tcore train` takes them), e.g. "
                             "'model.head.prototypes=4096'.")(function)


def json_option(function):
    return click.option("--json", "json_path", type=click.Path(dir_okay=False),
                        help="Write every figure, the settings, library versions and the "
                             "device name to this JSON file.")(function)


def compare_option(example: str, needs: str = ""):
    """--compare, with an example that this command's settings accept (and what else it
    needs)."""
    return click.option("--compare", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="Also run a second configuration in the same process, these "
                             "settings changed (named as in the JSON report's settings; "
                             "overrides= replaces --set), and print the samples/s ratio, "
                             f"e.g. '{example}'{needs}.")


def step_options(function):
    """The train step's options, shared by `bench model` and `bench train`."""
    for option in reversed([
            click.option("--arch", default="vit_small", show_default=True, type=ARCH,
                         help="Backbone preset."),
            click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1),
                         help="Clips per step (the targets are at 64)."),
            click.option("--attention", default="auto", show_default=True, type=ATTENTION,
                         help="Attention kernel; auto: xFormers on a GPU where it loads, "
                              "else SDPA."),
            click.option("--precision", default="auto", show_default=True, type=PRECISION,
                         help="auto: bf16 on GPUs that support it, fp16 on older GPUs, "
                              "fp32 on the CPU (as `tcore train`)."),
            click.option("--compile/--no-compile", "compile_", default=False,
                         show_default=True,
                         help="torch.compile the step's forward (losses included)."),
            click.option("--device", default="auto", show_default=True, type=DEVICE,
                         help=DEVICE_HELP)]):
        function = option(function)
    return function


# Errors whose message names what is wrong (a setting, a file): shown without a traceback.
NAMED_ERRORS = (ValueError, FileNotFoundError)


def fail_on_value_error(call, also=()):
    """Settings errors (ValueError) and missing files as a message; `also`: more types."""
    try:
        return call()
    except (*NAMED_ERRORS, *also) as error:
        raise click.ClickException(str(error)) from error


def echo_report(call, also=()) -> None:
    """Run the bench `call` and print its report, errors as `fail_on_value_error` gives
    them. When a --compare's second run failed, the first run's report is printed before
    the error, which says where else it went."""
    from tcore.bench import CompareFailed, format_report

    try:
        report = fail_on_value_error(call, also)
    except CompareFailed as failed:
        click.echo(format_report(failed.report))
        if not isinstance(failed.__cause__, (*NAMED_ERRORS, *also)):
            # a bug, or out of memory: its traceback too
            click.echo("".join(traceback.format_exception(failed.__cause__)), err=True)
        where = "above"
        if failed.json_path:
            where += f" and in {failed.json_path} (marked 'compare_failed')"
        raise click.ClickException(f"{failed}. The first run's figures are {where}") from failed
    click.echo(format_report(report))


def check_json_path(json_path: str | None) -> None:
    """--json is writable: checked before `bench agree` runs, not after (`run_bench` checks
    it for the others)."""
    if json_path:
        make_output_file_directory(json_path, f"--json {json_path}")


def data_errors() -> tuple[type[Exception], ...]:
    """The data pipeline's errors that name the shard or sample at fault (ShardDirError: a bad
    manifest and the loader's start-up checks). Imported only by the commands that read
    shards: the model benches run where DALI is not installed."""
    from tcore.pipelines.stage_a import BadSampleError
    from tcore.preprocess.errors import ShardDirError
    return ShardDirError, BadSampleError


@click.group(name="bench")
def bench():
    """Measure throughput: the model step, the data loaders, training end to end."""


@bench.command(name="model")
@step_options
@click.option("--local-crops", "n_local", default=8, show_default=True, type=click.IntRange(min=0),
              help="Local crops per clip (8 in training).")
@click.option("--global-size", default=224, show_default=True, type=click.IntRange(min=16),
              help="Global crop size of the synthetic batch, a multiple of 16 (224 in "
                   "training; smaller for quick checks).")
@click.option("--local-size", default=96, show_default=True, type=click.IntRange(min=16),
              help="Local crop size of the synthetic batch, a multiple of 16 (96 in training).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps first (compilation and autotuning happen there).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed repeats; each gives one samples/s figure, summarised by median "
                   "and spread.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1),
              help="Steps timed back to back in EACH repeat (--repeats x --steps steps in "
                   "all; `bench train --steps` is the total instead).")
@click.option("--peak-size", default=0, show_default=True, type=click.IntRange(min=0),
              help="Matmul size for the peak rate (0: 8192 on GPU, 1024 on CPU).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a torch.profiler kernel table and trace of 3 steps here "
                   f"{PROFILE_COMPARE}.")
@overrides_option
@json_option
@compare_option("attention=math,precision=fp32")
def model(arch, batch, attention, precision, compile_, device, n_local, global_size, local_size,
          warmup, repeats, steps, peak_size, profile_dir, overrides, json_path, compare):
    """The full T-CoRe train step on device-resident synthetic batches."""
    from tcore.bench import ModelBenchSettings, run_bench

    settings = ModelBenchSettings(arch=arch, batch=batch, attention=attention, precision=precision,
                                  compile=compile_, device=device, n_local=n_local,
                                  global_size=global_size, local_size=local_size, warmup=warmup,
                                  repeats=repeats, steps=steps, peak_size=peak_size,
                                  overrides=overrides)
    echo_report(lambda: run_bench("model", settings, compare, json_path, profile_dir))


@bench.command(name="data")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard directory (from `tcore shards build`).")
@click.option("--loader", default="both", show_default=True,
              type=click.Choice(["dali", "baseline", "both", "stage-a"]),
              help="both: DALI, then the baseline loader, and their samples/s ratio. "
                   "stage-a: the DALI loader's stage A alone (read, draws, masks, pickle), "
                   "the ceiling it puts on the loader.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE,
              help="Where the loader delivers (and, for DALI, makes) the batches. " + DEVICE_HELP)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="Thread budget: DALI's CPU threads, the baseline's worker processes.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Clips per batch.")
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="How long batches are timed (after the warm-up), per loader.")
@click.option("--warmup", "warmup_batches", default=3, show_default=True, type=click.IntRange(min=0),
              help="Batches drawn before the clock starts (for DALI at least its "
                   "prefetch + 1, so no prefilled batch is timed).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Windows the timed batches are split into, one samples/s figure each.")
@click.option("--set", "overrides", default="", metavar="KEY=VALUE[,KEY=VALUE]",
              help="Pipeline-config overrides (the data.pipeline keys), e.g. "
                   "'views.color_jitter=fast'.")
@json_option
@compare_option("overrides=views.color_jitter=fast", needs=" (with --loader dali or "
                "baseline: both already compares two runs)")
def data(data_dir, loader, device, threads, batch, seconds, warmup_batches, repeats, overrides,
         json_path, compare):
    """Samples/s and batch latency of the DALI pipeline and of the baseline loader."""
    from tcore.bench import DataBenchSettings, run_data_loaders

    settings = DataBenchSettings(data=data_dir, device=device, threads=threads, batch=batch,
                                 seconds=seconds, warmup_batches=warmup_batches, repeats=repeats,
                                 overrides=overrides)
    echo_report(lambda: run_data_loaders(settings, loader, compare, json_path), data_errors())


@bench.command(name="train")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard directory (from `tcore shards build`).")
# tcore.bench.train.TRAIN_LOADERS (a test keeps the two equal)
@click.option("--loader", default="dali", show_default=True, type=click.Choice(["dali", "baseline"]),
              help="The loader feeding the step.")
@step_options
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1),
              help="The loader's thread budget (DALI threads, baseline workers).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps first; at least the loader's prefetch + 1, so the timed "
                   "steps do not start on batches queued in advance.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Steps timed IN ALL, split into the --repeats windows (at least one step "
                   "per window; `bench model --steps` is per repeat instead).")
@click.option("--repeats", default=4, show_default=True, type=click.IntRange(min=1),
              help="Windows the --steps are split into, one samples/s figure each.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Then profile 3 more steps (loader included): kernel and CPU tables, trace "
                   f"{PROFILE_COMPARE}.")
@overrides_option
@json_option
@compare_option("attention=math,precision=fp32")
def train(data_dir, loader, arch, batch, attention, precision, compile_, device, threads,
          warmup, steps, repeats, profile_dir, overrides, json_path, compare):
    """End to end: the loader feeding the train step; samples/s and data-wait fraction."""
    from tcore.bench import TrainBenchSettings, run_bench

    settings = TrainBenchSettings(data=data_dir, loader=loader, arch=arch, batch=batch,
                                  attention=attention, precision=precision, compile=compile_,
                                  device=device, threads=threads, warmup=warmup,
                                  steps=steps, repeats=repeats, overrides=overrides)
    echo_report(lambda: run_bench("train", settings, compare, json_path, profile_dir),
                data_errors())


@bench.command(name="agree")
@click.option("--arch", default="vit_small", show_default=True, type=ARCH,
              help="Backbone preset (random weights, LayerScale 1.0).")
@click.option("--attention", default="xformers", show_default=True, type=ATTENTION,
              help="The backend checked.")
@click.option("--reference", default="sdpa", show_default=True, type=ATTENTION,
              help="The backend it is checked against.")
@click.option("--precision", default="bf16", show_default=True,
              type=click.Choice(["bf16", "fp16", "fp32"]), help="Autocast precision of both.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images (224 px, random) per forward.")
@click.option("--tolerance", default=0.02, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Largest accepted difference relative to the output's max magnitude (> 0).")
@json_option
def agree(arch, attention, reference, precision, device, batch, tolerance, json_path):
    """Check two attention backends give the same backbone outputs and the same attention
    on random q, k, v of the backbone's shapes (exit 1 if not)."""
    from tcore.bench import attention_agreement
    from tcore.bench.report import write_json_atomic

    check_json_path(json_path)
    result = fail_on_value_error(lambda: attention_agreement(
        arch, (attention, reference), device, precision, batch))
    worst = max(d["max_rel"] for d in result["differences"].values())
    result["tolerance"], result["agree"] = tolerance, worst <= tolerance
    # As the other reports keep theirs: what was asked for (`resolved`: what ran).
    result["settings"] = {"arch": arch, "attention": attention, "reference": reference,
                          "precision": precision, "device": device, "batch": batch,
                          "tolerance": tolerance}
    if json_path:
        fail_on_value_error(lambda: write_json_atomic(json_path, result))
    resolved = " vs ".join(result["resolved"])
    click.echo(f"[bench agree] {arch} {precision} {resolved}: "
               + ", ".join(f"{k} max_abs={d['max_abs']:.3g} max_rel={d['max_rel']:.3g}"
                           for k, d in result["differences"].items())
               + f" -> {'AGREE' if result['agree'] else 'DISAGREE'} (tolerance {tolerance})")
    if not result["agree"]:
        raise SystemExit(1)


@bench.command(name="table")
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--targets/--no-targets", default=False, show_default=True,
              help="Also check the project's performance targets against these reports.")
def table(reports, targets):
    """One summary table over `--json` report files."""
    from tcore.bench import summary_table

    click.echo(fail_on_value_error(lambda: summary_table(list(reports), targets)))

