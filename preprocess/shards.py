"""`tcore shards build`: videos (or images) -> WebDataset tar shards + DALI index + manifest.

Determinism: inputs are sorted by relative path (their index is the key's prefix), then put
in a seeded random order (`shuffle_seed`; None keeps the sorted order); shard k holds
whichever of the inputs at places k*S .. k*S+S-1 of that order succeed; encoders are
single-threaded and bit-exact; tar headers carry fixed metadata. So the same inputs and
options give byte-identical shards, whatever `--workers`.

Why shuffled: DALI's webdataset reader streams the shards in order through a shuffle buffer
of about a thousand samples, so shards in class order (Kinetics: ~600 videos a class, ImageNet
~1,300 images) would give batches of one or two classes, where the reference samples the
whole dataset at random.

Resumability: each shard is written under a temporary name; its index is renamed into place,
then the tar, then a small record `OUT/.build/<prefix>-%06d.json` (sample count, bytes,
failures). A shard counts as done only once its record exists, so a rerun after any
interruption (kill -9 included) rebuilds exactly the shards without a record; it first
removes, under the build lock, the temporaries the interrupted run left (of its shards, and of
manifest.json, failures.jsonl and options.json).

Failures: an input that cannot become a sample (BadInput) is recorded in failures.jsonl and
the build carries on; any other error (an encoder that refuses its options, a worker process
that dies) stops the build with BuildError, keeping the shards already finished. A build
where every input failed writes failures.jsonl, no manifest and no build state (so that a
rerun retries every input), and stops with BuildError naming failures.jsonl.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from tcore.preprocess.discover import Inputs, Source, discover_class_folders, discover_list, sample_key
from tcore.preprocess.errors import BadInput, ShardDirError
from tcore.preprocess.files import check_output_path, make_output_directory, temporary_prefix
from tcore.preprocess.images import prepare_image
from tcore.preprocess.index import format_index
from tcore.preprocess.locks import UNNAMED_HOLDER, exclusive_lock
from tcore.preprocess.manifest import (CLIP_EXTS, FAILURES_NAME, MANIFEST_NAME, load_manifest,
                                       make_manifest, merge_manifest_parts, read_json,
                                       validate_manifest, with_default_options, write_json_atomic,
                                       write_jsonl_atomic)
from tcore.preprocess.tarwriter import ShardTarWriter
from tcore.preprocess.video import (FRAME_CODECS, VIDEO_CODECS, VP9_SPEED, encode_clip,
                                    encode_jpeg_frames, read_clip, require_av)

STATE_DIR = ".build"
BUILD_LOCK = "lock"       # in STATE_DIR: held by the build running (preprocess.locks)
OPTIONS_NAME = "options.json"   # in STATE_DIR: the options (and inputs) of the build in OUT
INPUTS_NAME = "inputs.json"     # in STATE_DIR: the inputs' keys, to name what changed since
INPUT_OPTIONS = ("inputs", "inputs_sha256", "input_keys")   # the options that stand for the input files
DEFAULT_GOP = 20  # one keyframe per 20-frame clip: smallest and fastest for the sampler (docs/PERFORMANCE.md)
# Highest --crf per codec: libvpx-vp9 refuses more when the encoder opens (after the inputs are
# decoded), libx264 (8-bit) silently clamps to 51. 0 is lossless (h264) / best (vp9).
MAX_CRF = {"vp9": 63, "h264": 51}


class BuildError(Exception):
    """The build cannot go on (not a bad input): an encoder that refuses its settings, a
    worker process that died. Finished shards are kept; a rerun resumes."""


@dataclass(frozen=True)
class BuildConfig:
    """Every option that changes the shard bytes (the build's fingerprint)."""
    kind: str = "video"
    frames: int | None = 20
    short_side: int = 320
    codec: str = "vp9"
    gop: int = DEFAULT_GOP
    crf: int | None = None
    quality: int = 90
    vp9_speed: int = VP9_SPEED
    allow_upscale: bool = False
    samples_per_shard: int = 1000
    prefix: str = "shard"
    shuffle_seed: int | None = 0   # None: shards in sorted (class) order

    def validate(self) -> None:
        if self.kind not in ("video", "image"):
            raise ValueError(f"kind must be 'video' or 'image', got {self.kind!r}")
        if self.kind == "video":
            if self.codec not in (*VIDEO_CODECS, *FRAME_CODECS):
                raise ValueError(f"codec must be one of {sorted(VIDEO_CODECS) + list(FRAME_CODECS)}, "
                                 f"got {self.codec!r}")
            if not self.frames or self.frames < 1:
                raise ValueError(f"frames must be >= 1, got {self.frames}")
            if not 0 <= self.vp9_speed <= 8:
                raise ValueError(f"vp9 speed must be in 0..8, got {self.vp9_speed}")
            if self.gop < 1:
                raise ValueError(f"gop must be >= 1, got {self.gop}")
            if self.crf is not None and self.codec in MAX_CRF and not 0 <= self.crf <= MAX_CRF[self.codec]:
                raise ValueError(f"crf for {self.codec} must be in 0..{MAX_CRF[self.codec]}, got {self.crf}")
        if self.short_side < 0 or self.short_side % 2:
            raise ValueError(f"short side must be an even number >= 0 (0 = keep), got {self.short_side}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples per shard must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.shuffle_seed is not None and (type(self.shuffle_seed) is not int or self.shuffle_seed < 0):
            raise ValueError(f"shuffle seed must be an integer >= 0, got {self.shuffle_seed!r}")
        if not self.prefix:
            raise ValueError("prefix must not be empty")
        if any(c in self.prefix for c in "/\\."):
            raise ValueError(f"prefix {self.prefix!r} must be a plain name (no dots or slashes)")
        if self.prefix.startswith("-"):
            raise ValueError(f"prefix {self.prefix!r} must not start with '-' (shard names would "
                             "read as command-line options)")

    @property
    def clip_ext(self) -> str:
        return CLIP_EXTS[self.codec]

    def shard_name(self, shard_id: int) -> str:
        return f"{self.prefix}-{shard_id:06d}"


@dataclass
class BuildResult:
    manifest: dict
    manifest_path: Path
    processed_inputs: int  # inputs handled by this run (shards already done are skipped)
    seconds: float
    built_shards: int    # shards (tars) this run wrote; a shard whose every input failed has none
    skipped_shards: int  # shards (tars) an earlier run had finished
    failures: list[dict] = field(default_factory=list)
    failures_path: Path | None = None   # failures.jsonl, or this node's of a split build
    unchanged_failures: int = 0   # --retry-failed: failed inputs whose files are as they were

    @property
    def inputs_per_second(self) -> float:
        return self.processed_inputs / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- one sample / one shard

def _video_sample(source: Source, label: int, config: BuildConfig) -> list[tuple[str, bytes]]:
    clip = read_clip(source.path, config.frames, config.short_side, config.allow_upscale)
    extra = {}
    if config.codec in FRAME_CODECS:
        images = encode_jpeg_frames(clip.frames, config.quality)
        data, extra["frame_bytes"] = b"".join(images), [len(image) for image in images]
    else:
        data = encode_clip(clip.frames, config.codec, config.gop, config.crf, config.quality,
                           config.vp9_speed)
    meta = {**extra, "source": source.relative, "label": label, "class": source.class_name,
            "frames": config.frames, "width": clip.width, "height": clip.height,
            "fps": round(clip.source_fps, 6), "duration": round(clip.source_duration, 6),
            "source_frames": clip.source_frames, "frame_indices": clip.frame_indices,
            "codec": config.codec}
    return [(config.clip_ext, data), ("json", json.dumps(meta, sort_keys=True).encode()),
            ("cls", str(label).encode())]


def _image_sample(source: Source, label: int, config: BuildConfig) -> list[tuple[str, bytes]]:
    image = prepare_image(source.path, config.short_side, config.quality, config.allow_upscale)
    meta = {"source": source.relative, "label": label, "class": source.class_name,
            "width": image.width, "height": image.height, "source_width": image.source_width,
            "source_height": image.source_height, "reencoded": image.reencoded, "codec": "jpeg"}
    return [("jpg", image.data), ("json", json.dumps(meta, sort_keys=True).encode()),
            ("cls", str(label).encode())]


def make_sample(source: Source, label: int, config: BuildConfig) -> list[tuple[str, bytes]]:
    """Components of one sample; raises BadInput when the input is unusable (any other
    error is a fault of the build's set-up or of the code, not of this input)."""
    if source.problem:   # first: a folder or a broken link has no path, but a better reason
        raise BadInput(source.problem)
    if source.path is None:
        raise BadInput("file not found")
    return (_video_sample if config.kind == "video" else _image_sample)(source, label, config)


def _record_path(out: Path, config: BuildConfig, shard_id: int) -> Path:
    return out / STATE_DIR / f"{config.shard_name(shard_id)}.json"


def _tmp_path(path: Path) -> Path:
    # Per-process names: a stray writer (e.g. an orphaned worker of a killed build) can never
    # interleave its bytes with a rerun's; both would rename identical, complete files.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove_stale_tmp(out: Path, config: BuildConfig, shard_ids: list[int]) -> None:
    """Delete temporary files left by interrupted runs for these shards: `<shard>.tar.tmp-*`
    and `.idx.tmp-*` in OUT, `.<shard>.json.tmp-*` in OUT/.build. One listing of each folder
    (not one per shard: thousands of shards on a network file system), names matched by
    text, so a prefix holding [ ] * ? matches only itself."""
    names = {config.shard_name(shard_id) for shard_id in shard_ids}
    for folder, owner in ((out, _shard_of_temporary), (out / STATE_DIR, _shard_of_record_temporary)):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if owner(entry.name) in names:
                Path(entry.path).unlink(missing_ok=True)


def _shard_of_temporary(filename: str) -> str | None:
    """`shard-000001.tar.tmp-123` -> `shard-000001` (its tar's or index's temporary)."""
    stem, found, _ = filename.rpartition(".tmp-")
    return stem.rsplit(".", 1)[0] if found and "." in stem else None


def _shard_of_record_temporary(filename: str) -> str | None:
    """`.shard-000001.json.tmp-abc` -> `shard-000001` (a record's write_atomically temporary)."""
    stem, _, rest = filename.partition(".json.tmp-")
    return stem[1:] if rest and stem.startswith(".") else None


def _output_files(out: Path, node_rank: int, num_nodes: int) -> tuple[Path, Path]:
    """This node's manifest and failures files."""
    if num_nodes == 1:
        return out / MANIFEST_NAME, out / FAILURES_NAME
    suffix = node_suffix(node_rank, num_nodes)
    return out / f"manifest.{suffix}.json", out / f"failures.{suffix}.jsonl"


def _remove_stale_outputs(out: Path, config: BuildConfig, shard_ids: list[int], node_rank: int,
                          num_nodes: int) -> None:
    """At start-up, under the build lock (so that no live build's file is touched): delete
    the temporaries a killed run of this node left, of its shards and of the files it writes
    with write_atomically (a kill -9 during their rename leaves `.manifest.json.tmp-...`)."""
    _remove_stale_tmp(out, config, shard_ids)
    written = list(_output_files(out, node_rank, num_nodes))
    if num_nodes == 1:   # the nodes of a split build share options.json, each under its own lock
        written += [out / STATE_DIR / OPTIONS_NAME, out / STATE_DIR / INPUTS_NAME]
    for path in written:
        for stale in path.parent.glob(glob.escape(temporary_prefix(path)) + "*"):
            stale.unlink(missing_ok=True)


def build_one_shard(out: Path, config: BuildConfig, shard_id: int, items: list[tuple[int, Source, int]],
                    tick=None) -> dict:
    """Write shard `shard_id` from (input index, source, label) items; return its record.
    A write the OS refuses (disk full) stops the build naming the shard (`run_build` then
    removes the temporaries)."""
    tar_path = out / f"{config.shard_name(shard_id)}.tar"
    try:
        return _write_shard(out, config, shard_id, items, tick)
    except OSError as err:
        raise BuildError(f"{tar_path}: cannot write: {err.strerror or err}; the build stops "
                         "(shards already finished are kept: rerun the same command to "
                         "resume)") from err


# The file state of a failure no file change explains (an unexpected error: a library's
# bug, a passing I/O error), which a retry always takes again.
RETRY_ALWAYS = "retry"


def _failure(source: Source, error: str, state) -> dict:
    """A failed input as its shard's record keeps it: what failures.jsonl says (`source`,
    `error`), and the input's key and file state, by which a retry sees it changed."""
    return {"source": source.relative, "error": error, "input": source.key, "file": state}


def input_file_state(source: Source) -> list | None:
    """[size, mtime_ns] of the input's file, None where there is none (not its path: a
    dataset moved with its modification times kept is the same files)."""
    try:
        stat = os.stat(source.path) if source.path else None
    except OSError:
        stat = None
    return [stat.st_size, stat.st_mtime_ns] if stat else None


def _reported(failure: dict) -> dict:
    """A failure as failures.jsonl and the build's result give it."""
    return {"source": failure["source"], "error": failure["error"]}


def _write_shard(out: Path, config: BuildConfig, shard_id: int, items: list[tuple[int, Source, int]],
                 tick=None) -> dict:
    name = config.shard_name(shard_id)
    tar_path, index_path = out / f"{name}.tar", out / f"{name}.idx"
    failures, unexpected = [], None
    with ShardTarWriter(_tmp_path(tar_path)) as writer:
        for input_index, source, label in items:
            state = input_file_state(source)   # before the read: a file landing meanwhile
            try:                                # then counts as changed for a retry
                components = make_sample(source, label, config)
            except BadInput as err:  # bad input never stops a build
                failures.append(_failure(source, str(err), state))
            except Exception as err:
                # Not a known kind of bad input: logged with its type, so that one odd file
                # among 240k cannot stop (and, rerun, stop again) a Kinetics build...
                failures.append(_failure(source, f"{type(err).__name__}: {err}", RETRY_ALWAYS))
                unexpected = unexpected or (source, err)
            else:
                writer.add_sample(sample_key(input_index, source), components)
            if tick is not None:
                tick(1)
    samples = len(writer.samples)
    if not samples and unexpected:
        # ...but a shard where nothing was built and not for bad input is a set-up fault
        # (e.g. an encoder refusing its options): stop rather than build shards of failures.
        _tmp_path(tar_path).unlink(missing_ok=True)
        source, err = unexpected
        raise BuildError(f"{name}: no sample built; {source.relative} failed with "
                         f"{type(err).__name__}: {err}; the build stops (shards already "
                         "finished are kept)") from err
    if samples:
        _tmp_path(index_path).write_text(format_index(writer.samples))
        os.replace(_tmp_path(index_path), index_path)
        os.replace(_tmp_path(tar_path), tar_path)
    else:  # every input failed: no tar (an empty tar is not a valid webdataset shard)
        _tmp_path(tar_path).unlink()
        for stale in (tar_path, index_path):
            stale.unlink(missing_ok=True)
    record = {"shard": shard_id, "tar": tar_path.name, "index": index_path.name, "samples": samples,
              "bytes": tar_path.stat().st_size if samples else 0, "failures": failures}
    write_json_atomic(_record_path(out, config, shard_id), record)
    return record


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the build process dies (kill -9
    included), so no orphan keeps writing shards next to a rerun."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _shard_process(task, progress, slot: int, conn) -> None:
    """Body of a worker process: build one shard, counting finished inputs in
    `progress[slot]` (for the bar), and send back its record or the error that stopped it."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers

    def tick(n: int) -> None:
        progress[slot] += n

    try:
        outcome = build_one_shard(*task, tick=tick)
    except Exception as err:  # noqa: BLE001 - re-raised by the parent
        outcome = err
    try:
        conn.send(outcome)
    except Exception:  # noqa: BLE001 - an error that does not pickle: send its text
        conn.send(BuildError(f"{type(outcome).__name__}: {outcome}"))
    conn.close()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode} without a result"


# ---------------------------------------------------------------- the whole build

def shard_order(inputs: Inputs, shuffle_seed: int | None) -> list[int]:
    """The inputs' indices in the order the shards hold them: sorted when `shuffle_seed` is
    None, else sorted by a hash of (seed, the input's key: its relative path, or a Kinetics
    row's label/id_start_end, whichever file holds it). A hash rather than a shuffle, so
    the order never depends on a library's random stream, and each input's place relative
    to the others does not change when inputs are added."""
    indices = list(range(len(inputs.sources)))
    if shuffle_seed is None:
        return indices
    def place(i: int) -> bytes:
        # surrogateescape: a file name that is not UTF-8 keeps its bytes
        text = f"{shuffle_seed}\0{inputs.sources[i].key}".encode("utf-8", "surrogateescape")
        return hashlib.blake2b(text, digest_size=8).digest()
    return sorted(indices, key=place)


def _inputs_digest(inputs: Inputs) -> str:
    text = json.dumps([inputs.classes, [(s.key, s.class_name) for s in inputs.sources]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _options(config: BuildConfig, inputs: Inputs) -> dict:
    keys = "kinetics_rows" if any(source.identity for source in inputs.sources) else "paths"
    return {**asdict(config), "inputs": len(inputs.sources), "inputs_sha256": _inputs_digest(inputs),
            "input_keys": keys}


def _check_out_dir(out: Path, options: dict, keys: dict) -> bool:
    """Refuse a non-empty OUT built with other options (rather than mixing two builds);
    True when OUT holds no build yet (its options are to be recorded, under the lock)."""
    recorded = _recorded_options(out)
    previous = with_default_options(recorded) if recorded is not None else None
    if previous is not None and previous != options:
        if "input_keys" not in recorded and options["input_keys"] == "kinetics_rows":
            raise ShardDirError(f"{out} was begun by an earlier tcore, which named each "
                                "Kinetics row by the file found for it (a clip downloaded since "
                                "would move the inputs after it); it cannot be resumed: build "
                                "into a new output directory")
        raise _other_build(out, previous, options, keys)
    make_output_directory(out)
    (out / STATE_DIR).mkdir(exist_ok=True)
    return previous is None


def _recorded_options(out: Path) -> dict | None:
    """The options of the build in OUT as recorded (None: OUT holds no build yet); an OUT
    holding other files is refused."""
    saved = out / STATE_DIR / OPTIONS_NAME
    if saved.is_file():
        return read_json(saved, "build options file")
    if (out / MANIFEST_NAME).is_file():
        return load_manifest(out)["options"]
    if out.is_dir() and any(p.name not in (STATE_DIR, FAILURES_NAME)
                            and not p.name.startswith(".") for p in out.iterdir()):
        # Dot entries are no one's shards: tcore's probes and temporaries (a sibling node's,
        # starting at the same moment), or a desktop's .DS_Store.
        # failures.jsonl alone is what a build whose every input failed leaves.
        raise ShardDirError(f"{out} is not empty and holds no tcore shard build; choose an empty "
                            "or new output directory")
    return None


def _other_build(out: Path, previous: dict, options: dict, keys: dict) -> ShardDirError:
    """The error for an OUT built with other options or from other input files (told apart:
    the inputs' digest says nothing to the user, and no option brings the files back; the
    inputs added and removed are named where the build recorded its inputs)."""
    changed = sorted(k for k in set(previous) | set(options) if previous.get(k) != options.get(k))
    then, now = previous.get("inputs"), options["inputs"]
    if then == now:
        count = f"{now}, as then"
    elif then is None:   # a build made before the count was recorded
        count = f"{now} now"
    else:
        count = f"{then} then, {now} now"
    files = (f"another set of input files ({count}; files were added, removed or renamed since"
             f"{_inputs_changed(out, keys)})")
    others = [k for k in changed if k not in INPUT_OPTIONS]
    if not others:
        return ShardDirError(f"{out} already holds shards built from {files}; use a new output "
                             "directory, or build from the original files")
    details = ", ".join(f"{k}: {previous.get(k)!r} -> {options.get(k)!r}" for k in others)
    also = f", and from {files}" if len(others) < len(changed) else ""
    hint = (" (--no-shuffle for shards in sorted order)"
            if "shuffle_seed" in changed and previous["shuffle_seed"] is None else "")
    return ShardDirError(f"{out} already holds shards built with other options ({details}){also}; "
                         f"use a new output directory or the original options{hint}")


def _inputs_changed(out: Path, keys: dict) -> str:
    """'; removed: a, b; added: c' (and the classes') against the build's recorded inputs
    ('' where none were recorded)."""
    try:
        recorded = json.loads((out / STATE_DIR / INPUTS_NAME).read_text())
        then = {part: set(recorded[part]) for part in ("classes", "inputs")}
    except (OSError, ValueError, TypeError, KeyError):
        return ""
    now = {part: set(keys[part]) for part in ("classes", "inputs")}
    parts = []
    for part, what, names in (("classes", "classes removed", then["classes"] - now["classes"]),
                              ("classes", "classes added", now["classes"] - then["classes"]),
                              ("inputs", "removed", then["inputs"] - now["inputs"]),
                              ("inputs", "added", now["inputs"] - then["inputs"])):
        if names:
            names = sorted(names)
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{what}: {', '.join(names[:3])}{more}")
    hint = ("; a broken file deleted from a class folder can be put back as an empty file at "
            "its path (it fails again, and the build resumes)"
            if then["inputs"] - now["inputs"] else "")
    return "".join(f"; {part}" for part in parts) + hint


def _load_record(out: Path, config: BuildConfig, shard_id: int) -> dict | None:
    """The record of a finished shard, or None when the shard must be (re)built."""
    path = _record_path(out, config, shard_id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record["samples"] and not ((out / record["tar"]).is_file() and (out / record["index"]).is_file()):
        return None
    return record


def node_suffix(node_rank: int, num_nodes: int) -> str:
    return f"node-{node_rank:05d}-of-{num_nodes:05d}"


def discover_inputs(src=None, kind: str = "video", list_file=None, video_root=None) -> Inputs:
    if list_file is not None:
        return discover_list(list_file, video_root if video_root is not None else src, kind)
    if src is None:
        raise ValueError("give a source directory or --list FILE")
    return discover_class_folders(src, kind)


def run_build(src, out, *, kind: str = "video", frames: int = 20, short_side: int = 320,
              codec: str = "vp9", samples_per_shard: int = 1000, workers: int = 1,
              prefix: str = "shard", gop: int = DEFAULT_GOP, crf: int | None = None,
              quality: int = 90, vp9_speed: int = VP9_SPEED, allow_upscale: bool = False,
              shuffle_seed: int | None = 0, list_file=None, video_root=None,
              node_rank: int = 0, num_nodes: int = 1, progress: bool = True,
              retry_failed: bool = False) -> BuildResult:
    """Build (or resume) the shards of `src` into `out`; see build_shards. `retry_failed`:
    also rebuild the finished shards holding failed inputs (fixed or downloaded again
    since, under the same paths)."""
    config = BuildConfig(kind=kind, frames=frames if kind == "video" else None, short_side=short_side,
                         codec=codec if kind == "video" else "jpeg", gop=gop, crf=crf, quality=quality,
                         vp9_speed=vp9_speed,
                         allow_upscale=allow_upscale, samples_per_shard=samples_per_shard, prefix=prefix,
                         shuffle_seed=shuffle_seed)
    config.validate()
    if kind == "video":
        require_av("tcore shards build")
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} is not in 0..{num_nodes - 1}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = check_output_path(out)   # before discovering (maybe millions of) inputs
    # OUT inside SRC: the shards would be inputs of the next run, and a rerun (which should
    # resume) would find a new class folder and refuse the changed inputs.
    if src is not None and list_file is None and out.resolve().is_relative_to(
            Path(src).resolve()):
        raise ShardDirError(f"output {out} is inside the source folder {src}; give an output "
                            "outside it")
    inputs = discover_inputs(src, kind, list_file, video_root)
    options = _options(config, inputs)
    keys = {"classes": inputs.classes, "inputs": [source.key for source in inputs.sources]}
    _check_out_dir(out, options, keys)    # before the lock makes OUT/.build in a foreign folder
    with _build_lock(out, node_rank, num_nodes):
        # Checked again and written under the lock: a build that ran in between may have
        # recorded other options, and a start-up sweep never removes this temporary. Also
        # written where an older tcore kept them in the manifest alone: a retry removes it.
        _check_out_dir(out, options, keys)
        if not (out / STATE_DIR / OPTIONS_NAME).is_file():
            write_json_atomic(out / STATE_DIR / OPTIONS_NAME, options)
        if not (out / STATE_DIR / INPUTS_NAME).is_file():
            write_json_atomic(out / STATE_DIR / INPUTS_NAME, keys)
        return _build_this_nodes_shards(out, config, inputs, options, workers=workers,
                                        node_rank=node_rank, num_nodes=num_nodes,
                                        progress=progress, retry_failed=retry_failed)


@contextlib.contextmanager
def _build_lock(out: Path, node_rank: int, num_nodes: int):
    """One build per node into `out` at a time (tcore.preprocess.locks): a second one would
    remove the first one's temporaries as stale. A whole build holds `.build/lock` alone; the
    nodes of a split build share it (so neither kind starts beside the other) and each holds
    its own `lock.node-R-of-N`. (Two splits over different node counts at once are not
    told apart: checking for one made sibling nodes starting together refuse each other.)"""
    state = out / STATE_DIR

    def busy(who: Callable[[str], str]) -> Callable[[str], str]:
        return lambda holder: (f"{out}: {who(holder)} is building into this directory; wait "
                               "for it to end (a rerun afterwards resumes where it stopped)")
    builds = busy(lambda holder: "a build split over nodes" if holder == UNNAMED_HOLDER
                  else f"another tcore shards build ({holder})")
    with contextlib.ExitStack() as held:
        held.enter_context(exclusive_lock(state / BUILD_LOCK, builds, shared=num_nodes > 1))
        if num_nodes > 1:
            held.enter_context(exclusive_lock(
                state / f"{BUILD_LOCK}.{node_suffix(node_rank, num_nodes)}",
                busy(lambda holder: f"another tcore shards build ({holder}) as node "
                                    f"{node_rank} of {num_nodes}")))
        yield


def _build_this_nodes_shards(out: Path, config: BuildConfig, inputs, options: dict, *,
                             workers: int, node_rank: int, num_nodes: int,
                             progress: bool, retry_failed: bool = False) -> BuildResult:
    """The shards of this node not yet finished (and, retrying, those with failures), then
    its manifest and failures."""
    kind = config.kind
    size = config.samples_per_shard
    shard_count = -(-len(inputs.sources) // size)
    mine = [k for k in range(shard_count) if k % num_nodes == node_rank]
    _remove_stale_outputs(out, config, mine, node_rank, num_nodes)
    records = {k: _load_record(out, config, k) for k in mine}
    unchanged = 0
    if retry_failed:
        unchanged = _forget_shards_with_failures(
            out, config, records, _manifests_made_stale(out, node_rank, num_nodes),
            {source.key: source for source in inputs.sources})
    todo = [k for k in mine if records[k] is None]
    order = shard_order(inputs, config.shuffle_seed)
    tasks = []
    for k in todo:
        items = [(i, inputs.sources[i], inputs.label(inputs.sources[i].class_name))
                 for i in order[k * size:(k + 1) * size]]
        tasks.append((out, config, k, items))
    total = sum(len(task[3]) for task in tasks)

    start = time.perf_counter()
    bar = tqdm(total=total, unit="video" if kind == "video" else "image", disable=not progress,
               desc=f"shards ({len(todo)} to build, {len(mine) - len(todo)} done)", smoothing=0.1)
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                records[task[2]] = build_one_shard(*task, tick=bar.update)
        else:
            _run_pool(tasks, workers, records, bar)
    finally:  # also when the build stops: its workers are gone, their temporaries are junk
        bar.close()
        _remove_stale_tmp(out, config, mine)
    seconds = time.perf_counter() - start

    # by source, as merge_node_manifests lists them (the shards hold a shuffled order)
    failures = sorted((_reported(f) for k in mine for f in records[k]["failures"]),
                      key=lambda f: f["source"])
    shards = [{key: records[k][key] for key in ("tar", "index", "samples", "bytes")}
              for k in mine if records[k]["samples"]]
    if not shards and num_nodes == 1:
        _give_up_empty_build(out, config, mine, failures)
    manifest = make_manifest(kind=config.kind, frames=config.frames, codec=config.codec,
                             short_side=config.short_side, classes=inputs.classes, shards=shards,
                             failures=len(failures), options=options)
    manifest_file, failures_file = _output_files(out, node_rank, num_nodes)
    if num_nodes > 1:
        manifest["node"] = {"rank": node_rank, "count": num_nodes}
    write_jsonl_atomic(failures_file, failures)
    write_json_atomic(manifest_file, manifest)
    built = sum(1 for k in todo if records[k]["samples"])
    return BuildResult(manifest, manifest_file, total, seconds, built, len(shards) - built, failures,
                       failures_file, unchanged)


def _forget_shards_with_failures(out: Path, config: BuildConfig, records: dict,
                                 manifests: list[Path], sources: dict[str, Source]) -> int:
    """Mark the finished shards holding a failed input whose file changed since (fixed,
    downloaded, replaced) as not done; one whose failures are as they were (a clip still
    missing) is kept, so a retry after a few downloads re-encodes a few shards. The
    manifests that list them go first, then their records, before any tar is replaced: a
    retry stopped halfway leaves no manifest or record describing a tar that is no longer
    the one on disk (a loader refuses the directory until a rerun finishes it, naming the
    missing manifest). Their tars stay until the new ones replace them. Returns how many
    failed inputs stay as they were, not retried."""
    forgotten = [k for k, record in records.items()
                 if record is not None and any(_changed_since(failure, sources)
                                               for failure in record["failures"])]
    kept = sum(len(record["failures"]) for k, record in records.items()
               if record is not None and k not in forgotten)
    if forgotten:
        for manifest in manifests:
            manifest.unlink(missing_ok=True)
        for shard_id in forgotten:
            _record_path(out, config, shard_id).unlink()
            records[shard_id] = None
    return kept


def _changed_since(failure: dict, sources: dict[str, Source]) -> bool:
    """Whether a failed input's file is not the one that failed (a record of a tcore that
    kept no file state counts as changed)."""
    if "file" not in failure or failure["file"] == RETRY_ALWAYS or failure.get("input") not in sources:
        return True
    return input_file_state(sources[failure["input"]]) != failure["file"]


def _manifests_made_stale(out: Path, node_rank: int, num_nodes: int) -> list[Path]:
    """The manifests a node's rebuilt shards make wrong: its own, and a split build's merge."""
    own = _output_files(out, node_rank, num_nodes)[0]
    return [own] if num_nodes == 1 else [own, out / MANIFEST_NAME]


def _give_up_empty_build(out: Path, config: BuildConfig, shard_ids: list[int], failures: list[dict]) -> None:
    """Every input failed: keep failures.jsonl (it says why), drop this build's state, and
    stop. Without its records a rerun retries every input (after the files are fixed), and
    without options.json it accepts changed inputs; no manifest, as there is nothing to read."""
    write_jsonl_atomic(out / FAILURES_NAME, failures)
    for shard_id in shard_ids:  # all of them empty, so no tar or index is lost
        _record_path(out, config, shard_id).unlink(missing_ok=True)
    (out / STATE_DIR / OPTIONS_NAME).unlink(missing_ok=True)
    (out / STATE_DIR / INPUTS_NAME).unlink(missing_ok=True)
    (out / STATE_DIR / BUILD_LOCK).unlink(missing_ok=True)   # this build ends here
    try:
        (out / STATE_DIR).rmdir()
    except OSError:  # not empty: something else is there; leave it
        pass
    _remove_empty_manifest(out)
    stills = bool(failures) and all("a still image" in row.get("error", "") for row in failures)
    hint = " (every one a still image: for a folder of images, build with --kind image)" \
        if stills and config.kind == "video" else ""
    raise BuildError(f"no sample was built: all {len(failures)} inputs failed{hint}; "
                     f"{out / FAILURES_NAME} says why for each (fix or remove them, then rerun)")


def _remove_empty_manifest(out: Path) -> None:
    """A manifest listing no samples (left by an earlier tcore for such a build) would make
    loaders say "no samples" and a rerun compare against its options: remove it. One that
    lists samples is kept (nothing written is lost)."""
    try:
        empty = load_manifest(out)["total_samples"] == 0
    except ShardDirError:
        return
    if empty:
        (out / MANIFEST_NAME).unlink()


def _run_pool(tasks: list, workers: int, records: dict, bar) -> None:
    """Build shards in up to `workers` processes, one forked per shard (a shard is minutes
    of work, a fork milliseconds), ticking the bar per input. Owning the processes, rather
    than using a multiprocessing.Pool (whose task dies with its worker and never completes),
    lets the build see a worker die (the OOM killer, a crash in a codec library) and stop
    with the shard it was building."""
    context = mp.get_context("fork")
    progress = context.RawArray("q", len(tasks))  # inputs finished per task; one writer each
    waiting, running, shown = list(enumerate(tasks)), {}, 0
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                slot, task = waiting.pop(0)
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_shard_process, args=(task, progress, slot, writer),
                                          daemon=True)
                process.start()
                writer.close()  # the worker holds the only write end: its death reads as end of file
                running[process] = (task, reader)
            mp_connection.wait([reader for _, reader in running.values()], timeout=0.2)
            done = sum(progress)
            bar.update(done - shown)
            shown = done
            for process, (task, reader) in list(running.items()):
                if not reader.poll():
                    continue
                try:
                    outcome = reader.recv()
                except (EOFError, OSError):  # the worker ended without sending a result
                    outcome = None
                process.join()
                reader.close()
                del running[process]
                if isinstance(outcome, BaseException):
                    raise outcome
                if outcome is None:
                    name = task[1].shard_name(task[2])
                    others = ", ".join(t[1].shard_name(t[2]) for t, _ in running.values())
                    raise BuildError(
                        f"a worker process (pid {process.pid}) died while building {name} "
                        f"({_how_it_ended(process.exitcode)}; out of memory, or a crash in a codec "
                        "library?)" + (f"; also stopped: {others}" if others else "")
                        + ". Shards already finished are kept: rerun the same command to resume")
                records[outcome["shard"]] = outcome
    finally:  # an error, a dead worker or Ctrl-C: stop the shards still in progress
        for process in running:
            process.terminate()
        for process, (_, reader) in running.items():
            process.join()
            reader.close()


def build_shards(src, out, *, kind: str = "video", frames: int = 20, short_side: int = 320,
                 codec: str = "vp9", samples_per_shard: int = 1000, workers: int = 1,
                 prefix: str = "shard", **options) -> dict:
    """Build WebDataset shards from `src/<class>/<file>` (or `list_file=`) into `out` and
    return the manifest dict (also written to `out/manifest.json`).

    Other keyword options: gop, crf, quality, allow_upscale, shuffle_seed (default 0; None
    keeps the sorted order), list_file, video_root, node_rank, num_nodes, progress,
    retry_failed (also rebuild the finished shards holding failed inputs). Reruns resume; other options in a non-empty `out` are
    refused with ShardDirError."""
    return run_build(src, out, kind=kind, frames=frames, short_side=short_side, codec=codec,
                     samples_per_shard=samples_per_shard, workers=workers, prefix=prefix,
                     **options).manifest


def _split_builds_mixed(out: Path, paths: list[Path], manifests: list[dict]) -> str:
    """The error for node manifests of builds split over different node counts (an earlier
    attempt's left beside the build's): which files belong to which, and what to do."""
    by_count: dict = {}
    for path, manifest in zip(paths, manifests):
        by_count.setdefault(manifest.get("node", {}).get("count"), []).append(path.name)
    builds = "; ".join(f"{count} nodes: {', '.join(names)}"
                       for count, names in sorted(by_count.items(), key=lambda kv: str(kv[0])))
    return (f"{out} holds node manifests of builds split over different numbers of nodes "
            f"({builds}); remove the other build's files, or name this build's parts to merge")


def _check_node_shards(out: Path, path: Path, manifest: dict) -> None:
    """Every shard a node manifest lists is in `out`, with the size and (in its index's
    header) the sample count the node recorded: a shard rebuilt since, by a --retry-failed
    that stopped or a whole build over the split one, is not the one the manifest describes."""
    for shard in manifest["shards"]:
        tar = out / shard["tar"]
        if not tar.is_file() or not (out / shard["index"]).is_file():
            raise ShardDirError(f"shard {shard['tar']} (or its index) is not in {out}; copy every "
                                "node's shards there before merging")
        size, listed = tar.stat().st_size, _index_count(out / shard["index"])
        if size != shard["bytes"] or listed != shard["samples"]:
            raise ShardDirError(
                f"{tar} is {size} bytes with {listed} samples in its index, where {path.name} "
                f"says {shard['bytes']} bytes and {shard['samples']} samples: it was built again "
                "since that node's manifest was written; rerun that node's build (the same "
                "command), then merge")


def _index_count(index: Path) -> int | None:
    """The sample count in an index file's header (its first line), None if unreadable."""
    with open(index) as handle:
        header = handle.readline().split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def merge_node_manifests(out, parts=None) -> dict:
    """Join the node manifests of a `--num-nodes` build into `out/manifest.json` and
    `out/failures.jsonl`. `parts` defaults to every `out/manifest.node-*.json`; all ranks
    must be present and every listed shard must exist in `out`."""
    out = Path(out)
    paths = [Path(p) for p in parts] if parts else sorted(out.glob("manifest.node-*.json"))
    if not paths:
        raise ShardDirError(f"{out} holds no node manifests (manifest.node-*.json)")
    manifests = [validate_manifest(read_json(path, "node manifest"), str(path)) for path in paths]
    ranks = sorted(m.get("node", {}).get("rank", -1) for m in manifests)
    counts = {m.get("node", {}).get("count") for m in manifests}
    if len(counts) > 1:
        raise ShardDirError(_split_builds_mixed(out, paths, manifests))
    if ranks != list(range(next(iter(counts)) or 0)):
        raise ShardDirError(f"node manifests in {out} cover ranks {ranks} of "
                            f"{next(iter(counts))} nodes; every node must finish before merging")
    merged = merge_manifest_parts(manifests, [str(p) for p in paths])
    for path, manifest in zip(paths, manifests):
        _check_node_shards(out, path, manifest)
    failures = []
    for path in paths:
        failure_file = path.with_name(path.name.replace("manifest.", "failures.", 1).replace(".json", ".jsonl"))
        if failure_file.is_file():
            failures += [json.loads(line) for line in failure_file.read_text().splitlines() if line]
    failures.sort(key=lambda row: row["source"])
    write_jsonl_atomic(out / FAILURES_NAME, failures)
    if not merged["shards"]:
        raise ShardDirError(f"no sample was built on any node: all {len(failures)} inputs "
                            f"failed; {out / FAILURES_NAME} says why for each")
    write_json_atomic(out / MANIFEST_NAME, merged)
    return merged
