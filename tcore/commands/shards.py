"""`tcore shards build | inspect | merge-manifest`: thin wrappers over tcore.preprocess."""
import sys

import click
from click.core import ParameterSource

from tcore.preprocess.errors import ShardDirError
from tcore.preprocess.shards import DEFAULT_GOP, BuildError, merge_node_manifests, run_build
from tcore.preprocess.video import FRAME_CODECS, VIDEO_CODECS, VP9_SPEED


@click.group(name="shards")
def shards():
    """Build WebDataset shards (+ DALI index, manifest) from videos or images."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _os_error(err: OSError) -> str:
    """`path: reason` for an OS error (OUT's parent is a file, no permission, disk full)."""
    if err.filename is None or err.strerror is None:
        return str(err)
    return f"{err.filename}: {err.strerror}"


# Options that only video clips use: given with --kind image they would do nothing.
_CLIP_OPTIONS = ("frames", "codec", "gop", "crf", "vp9_speed")
# The encoder options each --codec uses; the others would do nothing with it (MJPEG and
# JPEG frames are all keyframes, and only libvpx / x264 take a CRF).
_CODEC_OPTIONS = {"vp9": ("gop", "crf", "vp9_speed"), "h264": ("gop", "crf"),
                  "mjpeg": ("quality",), "jpegs": ("quality",)}


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _given(ctx, names) -> list[str]:
    return [_option(name) for name in names
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]


def _refuse_options_that_do_nothing(ctx, kind: str, codec: str) -> None:
    """An option the build would ignore is refused: given, it says the user expects an
    effect (e.g. --crf with --codec jpegs, whose quality is --quality)."""
    if kind == "image":
        given = _given(ctx, _CLIP_OPTIONS)
        if given:
            raise click.UsageError(f"{', '.join(given)}: options of video clips; --kind image "
                                   "stores each image as one JPEG (--quality sets it)")
        return
    unused = _given(ctx, [name for name in ("gop", "crf", "vp9_speed", "quality")
                          if name not in _CODEC_OPTIONS[codec]])
    if unused:
        uses = ", ".join(_option(name) for name in _CODEC_OPTIONS[codec])
        raise click.UsageError(f"{', '.join(unused)}: not used by --codec {codec}, which "
                               f"takes {uses}")


@shards.command(name="build")
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False),
              help="Inputs from a file: one path per line, or the Kinetics CSV (needs --video-root). SRC is then omitted.")
@click.option("--video-root", type=click.Path(exists=True, file_okay=False),
              help="Root for relative paths of --list (Kinetics: where <label>/<id>_<start>_<end>.* live).")
@click.option("--kind", type=click.Choice(["video", "image"]), default="video", show_default=True)
@click.option("--frames", default=20, show_default=True, help="Frames per clip (T), uniformly spaced over the video.")
@click.option("--short-side", default=320, show_default=True, help="Resize so the short side is this (even; 0 = keep).")
@click.option("--allow-upscale", is_flag=True, help="Enlarge sources smaller than --short-side.")
@click.option("--codec", type=click.Choice(sorted(VIDEO_CODECS) + list(FRAME_CODECS)), default="vp9",
              show_default=True,
              help="Clip codec: vp9 (WebM), h264 (MP4) or mjpeg (MKV); or jpegs: the T frames as "
                   "separate JPEGs (larger; only the 3 drawn frames are decoded, nvJPEG on a GPU). "
                   "DALI's CPU decoder reads vp9/mjpeg/jpegs only.")
@click.option("--gop", default=DEFAULT_GOP, show_default=True, help="Keyframe interval in frames (clips only; DALI decodes a clip from its start whatever the GOP, and 1 decoded 3x slower: keep 20).")
@click.option("--crf", type=int, default=None, help="Constant quality for vp9/h264 (default 30 / 23).")
@click.option("--quality", default=90, show_default=True, help="JPEG quality 1-100 for images, mjpeg and jpegs.")
@click.option("--vp9-speed", default=VP9_SPEED, show_default=True, help="libvpx cpu-used (realtime mode).")
@click.option("--samples-per-shard", default=1000, show_default=True)
@click.option("--shuffle-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the order the shards hold the inputs in: random, so that the "
                   "loader's batches mix classes (DALI reads shards in order through a small "
                   "shuffle buffer).")
@click.option("--no-shuffle", is_flag=True,
              help="Keep the inputs in sorted (class) order; batches then hold one or two classes.")
@click.option("--prefix", default="shard", show_default=True, help="Shard file prefix: <prefix>-%06d.tar")
@click.option("--workers", default=1, show_default=True, help="Processes, each writing whole shards.")
@click.option("--node-rank", default=0, show_default=True, type=click.IntRange(min=0),
              help="This machine's rank when several split one build.")
@click.option("--num-nodes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Machines splitting the build (then run merge-manifest).")
@click.option("--retry-failed", is_flag=True,
              help="Also rebuild the finished shards holding a failed input whose file "
                   "changed since (fixed or downloaded again, under the same path; a "
                   "Kinetics row in any container); their other samples are encoded again "
                   "too.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def build(ctx, paths, list_file, video_root, no_shuffle, **options):
    """Build shards from SRC/<class>/<file> (or --list FILE) into OUT. Reruns resume."""
    _refuse_options_that_do_nothing(ctx, options["kind"], options["codec"])
    if no_shuffle:
        if options["shuffle_seed"] != 0:
            raise click.UsageError("--no-shuffle keeps the sorted order: give it or --shuffle-seed, "
                                   "not both")
        options["shuffle_seed"] = None
    if list_file:
        if len(paths) not in (1, 2):
            raise click.UsageError("with --list give OUT (or SRC OUT, SRC being the video root)")
        src, out = (paths[0] if len(paths) == 2 else None), paths[-1]
    elif len(paths) != 2:
        raise click.UsageError("give SRC and OUT")
    else:
        src, out = paths
    try:
        result = run_build(src, out, list_file=list_file, video_root=video_root, **options)
    except KeyboardInterrupt:   # Ctrl-C: the finished shards are kept; say how to go on
        click.echo(f"\ntcore shards build: interrupted; the finished shards in {out} are kept: "
                   "rerun the same command to finish the build (until then it may have no "
                   "manifest, which a retry removes first)", err=True)
        sys.exit(130)
    except (ShardDirError, BuildError, ValueError, ModuleNotFoundError) as err:
        raise click.ClickException(str(err))
    except OSError as err:
        raise click.ClickException(_os_error(err))
    manifest = result.manifest
    click.echo(f"{result.manifest_path}: {manifest['total_samples']} samples in {len(manifest['shards'])} "
               f"shards, {_mib(manifest['total_bytes'])}; {manifest['failures']} inputs failed"
               + (f" (see {result.failures_path}; once they are fixed, "
                  "the same command with --retry-failed rebuilds their shards)"
                  if manifest["failures"] else ""))
    click.echo(f"this run: {result.processed_inputs} inputs in {result.seconds:.1f} s = "
               f"{result.inputs_per_second:.2f} {options['kind']}s/s with {options['workers']} worker(s); "
               f"{result.built_shards} shards built, {result.skipped_shards} already done")
    if result.unchanged_failures:
        click.echo(f"{result.unchanged_failures} failed inputs not retried: their files are as "
                   "they were when they failed (same size and modification time; `touch` one "
                   "to retry it)")
    if options["num_nodes"] > 1 and result.built_shards:
        click.echo(f"when every node has finished: tcore shards merge-manifest {out} (again, "
                   "if it was merged before)")


@shards.command(name="inspect")
@click.argument("out", type=click.Path(exists=True))
@click.option("--verify", is_flag=True, help="Decode every sample and report the ones that fail.")
def inspect(out, verify):
    """Print counts, sizes, codec and frames per sample of a shard directory."""
    from tcore.preprocess.verify import inspect_shards

    try:
        report = inspect_shards(out, verify=verify)
    except ShardDirError as err:
        raise click.ClickException(str(err))
    frames = report["frames"] if report["kind"] == "video" else "1 (images)"
    click.echo(f"{report['directory']}: {report['kind']} shards, codec {report['codec']}, "
               f"frames per sample {frames}, short side {report['short_side']}")
    click.echo(f"  {report['shards']} shards, {report['samples']} samples, {report['classes']} classes, "
               f"{_mib(report['bytes'])} ({report['bytes_per_sample'] / 1024:.1f} KiB/sample), "
               f"{report['failures']} inputs failed at build time")
    click.echo(f"  order: {report['order']}")
    if verify:
        click.echo(f"  per class: {report['per_class']}")
    for problem in report["problems"]:
        where = f"{problem['tar']}:{problem['key']}" if problem["key"] else problem["tar"]
        click.echo(f"  BAD {where}: {problem['error']}")
    if verify:
        click.echo(f"  verify: {len(report['problems'])} problem(s)")
    if report["problems"]:
        raise SystemExit(1)


@shards.command(name="merge-manifest")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("parts", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def merge_manifest(out, parts):
    """Join the node manifests of a --num-nodes build (default: OUT/manifest.node-*.json)."""
    try:
        manifest = merge_node_manifests(out, parts)
    except ShardDirError as err:
        raise click.ClickException(str(err))
    click.echo(f"{out}/manifest.json: {manifest['total_samples']} samples in {len(manifest['shards'])} "
               f"shards, {manifest['failures']} failures")
