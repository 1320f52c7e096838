"""`tcore eval`: label-propagation benchmarks (DAVIS-2017, VIP, JHMDB) and DAVIS scoring."""
from __future__ import annotations

import functools
import re

import click
from click.core import ParameterSource

from tcore.commands import check_torch_device

DEFAULT_SIZES = {"davis": "480x880", "jhmdb": "320x320"}


def parse_size(text: str | None):
    """'480x880' / '480,880' -> (480, 880); 'native' -> None (each video's own size)."""
    if text is None or text.lower() == "native":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not match:
        raise click.BadParameter(f"expected HxW (e.g. 480x880) or 'native', got {text!r}",
                                 param_hint="--size")
    return int(match.group(1)), int(match.group(2))


def check_checkpoint_file(ctx, param, value):
    """A run directory is the likeliest directory given here: point at its files."""
    from pathlib import Path
    if value is not None and Path(value).is_dir():
        raise click.BadParameter(
            f"{value} is a directory; give a checkpoint file (of a `tcore train` run: "
            f"{Path(value) / 'teacher_backbone.safetensors'}, the final teacher, or "
            f"{Path(value) / 'checkpoints'}/checkpoint-N.pt)", ctx=ctx, param=param)
    return value


def check_arch_name(ctx, param, value):
    """Before the checkpoint is read. The names come from tcore.models, imported only when
    --arch is given (it brings torch)."""
    if value is None:
        return value
    from tcore.models import ARCHS
    if value not in ARCHS:
        raise click.BadParameter(f"unknown arch {value!r}; choose one of {sorted(ARCHS)}",
                                 ctx=ctx, param=param)
    return value


def propagation_options(topk: int):
    """Options shared by the propagation commands (METHOD.md section 7 defaults)."""
    def decorate(command):
        options = [
            click.option("--data", "data_root", required=True,
                         type=click.Path(exists=True, file_okay=False),
                         help="Benchmark root in its official layout."),
            click.option("--checkpoint", required=True, callback=check_checkpoint_file,
                         type=click.Path(exists=True),
                         help="tcore training checkpoint, teacher_backbone.safetensors, reference "
                              "T-CoRe checkpoint or DINOv2 backbone state dict."),
            click.option("--arch", default=None, callback=check_arch_name,
                         help="Backbone preset (e.g. vit_small): its head count, width and "
                              "depth; inferred from the checkpoint when left out."),
            click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False),
                         help="Directory for predictions, results.json and results.csv."),
            click.option("--topk", default=topk, show_default=True, type=click.IntRange(min=1)),
            click.option("--radius", default=20.0, show_default=True,
                         type=click.FloatRange(min=0, min_open=True),
                         help="Spatial radius in feature cells: a frame's labels come from "
                              "cells closer than this."),
            click.option("--temperature", default=0.7, show_default=True,
                         type=click.FloatRange(min=0, min_open=True)),
            click.option("--context", default=20, show_default=True, type=click.IntRange(min=1),
                         help="Previous frames in the context (plus the first frame)."),
            click.option("--device", default=None, callback=check_torch_device,
                         help="cuda / cpu (gpu is cuda; default: cuda if present)."),
            click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                         help="Frames per feature batch."),
            click.option("--chunk-size", default=1024, show_default=True,
                         type=click.IntRange(min=1),
                         help="Query locations per affinity chunk (bounds memory)."),
            click.option("--visualize", is_flag=True, help="Also write overlay strips."),
        ]
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _print_results(results: dict, output_dir: str) -> None:
    from tcore.eval.report import summary_table
    click.echo(summary_table(results))
    for warning in results.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"results: {output_dir}/results.json, {output_dir}/results.csv")


def _run(evaluate, checkpoint, arch, device, **kwargs):
    from pathlib import Path

    from tcore.eval.checkpoint import backbone_sizes, load_eval_backbone
    from tcore.eval.features import default_device
    device = device or str(default_device())
    backbone = load_eval_backbone(checkpoint, arch, device=device)
    run_info = {"checkpoint": str(Path(checkpoint).resolve()), "arch": arch,
                "backbone": backbone_sizes(backbone), "device": device}
    results = evaluate(backbone, device=device, run_info=run_info, **kwargs)
    _print_results(results, kwargs["output_dir"])


def _errors_as_click(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (FileNotFoundError, ValueError) as error:
            raise click.ClickException(str(error)) from error
    return wrapper


@click.group(name="eval")
def eval_group():
    """Semi-supervised label propagation benchmarks (CRW protocol, METHOD.md section 7)."""


@eval_group.command("davis")
@propagation_options(topk=7)
@click.option("--size", default=DEFAULT_SIZES["davis"], show_default=True,
              help="Input HxW (multiples of the backbone's patch size) or 'native' (each "
                   "video's own size).")
@_errors_as_click
def davis_command(checkpoint, arch, device, size, **kwargs):
    """DAVIS-2017 val: J&F like davis2017-evaluation."""
    from tcore.eval.davis import evaluate_davis
    _run(evaluate_davis, checkpoint, arch, device, size=parse_size(size), **kwargs)


@eval_group.command("vip")
@propagation_options(topk=10)
@click.option("--short-side", default=880, show_default=True, type=click.IntRange(min=1),
              help="Resize so the short side has this length (aspect kept).")
@click.option("--size", default=None,
              help="Fixed input HxW (multiples of the backbone's patch size) instead of "
                   "--short-side.")
@click.option("--long-side", default=None, type=click.IntRange(min=1),
              help="Instead of --short-side: the long side this length, the other floored to "
                   "a multiple of 64 (the released code's VIP loader; 880 there).")
@click.option("--score-first-frame", is_flag=True,
              help="Score frame 0 too, as its labels read out at the feature grid (the "
                   "released code's scoring; METHOD.md scores from frame 1).")
@click.pass_context
@_errors_as_click
def vip_command(ctx, checkpoint, arch, device, size, **kwargs):
    """VIP body parts: mIoU over the 20 classes."""
    from tcore.eval.vip import evaluate_vip
    if size is not None and parse_size(size) is None:   # not silently --short-side's size
        raise click.BadParameter("'native' is DAVIS only: vip takes --short-side N (the "
                                 "default, 880), --long-side N or a fixed HxW",
                                 param_hint="--size")
    # One of the three: results.json records the one that sized the inputs.
    given = [f"--{name.replace('_', '-')}" for name, set_ in (
        ("size", size is not None), ("long_side", kwargs["long_side"] is not None),
        ("short_side", ctx.get_parameter_source("short_side") is not ParameterSource.DEFAULT))
        if set_]
    if len(given) > 1:
        raise click.BadParameter(f"give one of --size HxW, --short-side N, --long-side N, not "
                                 f"{' and '.join(given)}", param_hint=given[0])
    _run(evaluate_vip, checkpoint, arch, device, size=parse_size(size), **kwargs)


@eval_group.command("jhmdb")
@propagation_options(topk=7)
@click.option("--size", default=DEFAULT_SIZES["jhmdb"], show_default=True, help="Input HxW.")
@click.option("--split", default=1, show_default=True, type=click.IntRange(min=1),
              help="Test split k: the videos splits/<class>_test_split<k>.txt marks 2.")
@_errors_as_click
def jhmdb_command(checkpoint, arch, device, size, **kwargs):
    """JHMDB pose propagation: PCK@0.1 and PCK@0.2."""
    from tcore.eval.jhmdb import evaluate_jhmdb
    size = parse_size(size)
    if size is None:
        raise click.BadParameter("jhmdb needs a fixed --size", param_hint="--size")
    _run(evaluate_jhmdb, checkpoint, arch, device, size=size, **kwargs)


@eval_group.command("davis-score")
@click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="DAVIS-2017 root (official layout).")
@click.option("--results", "results_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Predicted palette PNGs as RESULTS/<sequence>/%05d.png.")
@click.option("--split", default="val", show_default=True)
@click.option("--output", "output_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write results.json / results.csv (default: RESULTS).")
@_errors_as_click
def davis_score_command(data_root, results_dir, split, output_dir):
    """Score existing DAVIS predictions like the official davis2017-evaluation."""
    from pathlib import Path

    from tcore.eval.davis import score_davis
    from tcore.eval.report import write_results
    from tcore.preprocess.files import make_output_directory
    # checked before the scoring, as every command checks its output (RESULTS by default)
    make_output_directory(output_dir or results_dir,
                          f"--output {output_dir}" if output_dir else f"--results {results_dir}")
    results = {**score_davis(data_root, results_dir, split=split),
               "data": str(Path(data_root).resolve()),
               "predictions": str(Path(results_dir).resolve())}
    output_dir = output_dir or results_dir
    write_results(output_dir, results)
    _print_results(results, output_dir)
