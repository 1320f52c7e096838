"""`manifest.json` of a shard directory: writing, loading with validation, merging node parts.

Format (docs/ARCHITECTURE.md):
    {"format_version": 1, "kind": "video" | "image", "frames": T | null,
     "codec": "vp9" | "h264" | "mjpeg" | "jpegs" | "jpeg", "clip_ext": "webm" | "mp4" | "mkv" | "jpgs" | "jpg",
     "short_side": int, "classes": [...], "shards": [{"tar", "index", "samples", "bytes"}, ...],
     "total_samples": n, "total_bytes": b, "failures": n_failed, "options": {...}}
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tcore.preprocess.errors import ShardDirError
from tcore.preprocess.files import write_text_atomically

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
CLIP_EXTS = {"vp9": "webm", "h264": "mp4", "mjpeg": "mkv", "jpegs": "jpgs", "jpeg": "jpg"}
_REQUIRED = {"format_version": int, "kind": str, "codec": str, "clip_ext": str, "short_side": int,
             "classes": list, "shards": list, "total_samples": int, "total_bytes": int,
             "failures": int, "options": dict}
_SHARD_REQUIRED = {"tar": str, "index": str, "samples": int, "bytes": int}


def write_json_atomic(path, payload) -> None:
    text = json.dumps(payload, indent=1, sort_keys=True) + "\n"
    write_text_atomically(path, text)


def write_jsonl_atomic(path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    write_text_atomically(path, text)


def with_default_options(options: dict) -> dict:
    """Build options as recorded, plus what builds made before an option existed did:
    inputs in sorted order (`shuffle_seed` None), named by their paths (`input_keys`)."""
    return {"shuffle_seed": None, "input_keys": "paths", **options}


def holds_classes_in_order(manifest: dict) -> bool:
    """Shards that hold their inputs in sorted, so class, order (`--no-shuffle`, or a build
    made before shards were shuffled) and more than one class."""
    return (with_default_options(manifest["options"])["shuffle_seed"] is None
            and len(manifest["classes"]) > 1)


def make_manifest(*, kind: str, frames, codec: str, short_side: int, classes: list[str],
                  shards: list[dict], failures: int, options: dict) -> dict:
    shards = sorted(shards, key=lambda shard: shard["tar"])
    return {"format_version": FORMAT_VERSION, "kind": kind, "frames": frames, "codec": codec,
            "clip_ext": CLIP_EXTS[codec], "short_side": short_side, "classes": list(classes),
            "shards": shards, "total_samples": sum(s["samples"] for s in shards),
            "total_bytes": sum(s["bytes"] for s in shards), "failures": failures,
            "options": dict(options)}


def validate_manifest(manifest: dict, where: str = "manifest") -> dict:
    """Check types and internal consistency; raise ShardDirError naming `where` and the field."""
    if not isinstance(manifest, dict):
        raise ShardDirError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise ShardDirError(f"{where}: missing field {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ShardDirError(f"{where}: field {key!r} should be {kind.__name__}, "
                                f"got {type(manifest[key]).__name__}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardDirError(f"{where}: format_version {manifest['format_version']} is not supported "
                            f"(this tcore reads {FORMAT_VERSION})")
    if manifest["kind"] not in ("video", "image"):
        raise ShardDirError(f"{where}: kind must be 'video' or 'image', got {manifest['kind']!r}")
    if manifest["codec"] not in CLIP_EXTS or manifest["clip_ext"] != CLIP_EXTS[manifest["codec"]]:
        raise ShardDirError(f"{where}: codec {manifest['codec']!r} / clip_ext {manifest['clip_ext']!r} "
                            f"is not one of {CLIP_EXTS}")
    if manifest["kind"] == "video" and not (isinstance(manifest.get("frames"), int) and manifest["frames"] > 0):
        raise ShardDirError(f"{where}: a video manifest needs a positive integer 'frames'")
    for number, shard in enumerate(manifest["shards"]):
        for key, kind in _SHARD_REQUIRED.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                raise ShardDirError(f"{where}: shards[{number}] needs {key!r} ({kind.__name__})")
    if sum(s["samples"] for s in manifest["shards"]) != manifest["total_samples"]:
        raise ShardDirError(f"{where}: total_samples does not equal the sum over shards")
    return manifest


def manifest_path(path_or_dir) -> Path:
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def _hint(path: Path, what: str) -> str:
    """Advice for the usual slips: one shard's tar, or another file, named instead of the
    shard directory (nothing to add when the file is the one asked for, only broken)."""
    try:
        is_tar = path.suffix == ".tar" or tarfile.is_tarfile(path)
    except OSError:
        is_tar = False
    if is_tar:
        return f"; it is a shard tar: pass the shard directory that holds it ({path.parent})"
    if what == MANIFEST_NAME and path.name != MANIFEST_NAME:
        return "; pass a shard directory or its manifest.json"
    return ""


def read_json(path, what: str = MANIFEST_NAME):
    """The JSON value in `path`; ShardDirError naming the file when it cannot be read or is
    not JSON text (a binary file, e.g. a shard tar, would otherwise fail as UnicodeDecodeError)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ShardDirError(f"{path}: not a {what} (binary data, not JSON text){_hint(path, what)}") from None
    except OSError as err:
        raise ShardDirError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardDirError(f"{path}: not valid JSON ({err}){_hint(path, what)}") from None


def missing_manifest_hint(directory: Path) -> str:
    """What a shard directory without manifest.json holds instead, as " (...)", or "": a
    build whose every input failed, or a `--num-nodes` build not yet merged."""
    directory = Path(directory)
    if not directory.is_dir():
        return ""
    # A `--num-nodes` build leaves one manifest per node until they are merged.
    if any(directory.glob("manifest.node-*.json")):
        return (" (it holds node manifests, manifest.node-*.json: when every node has "
                f"finished, join them with `tcore shards merge-manifest {directory}`)")
    # failures.jsonl and no build state is what a build whose every input failed leaves.
    if (directory / FAILURES_NAME).is_file() and not (directory / ".build").exists():
        return f" (no sample was built? {directory / FAILURES_NAME} lists the inputs that failed)"
    return ""


def load_manifest(path_or_dir, check_files: bool = False) -> dict:
    """Read and validate `manifest.json` (give the file or its shard directory). With
    `check_files`, also check every listed tar and index file exists beside it."""
    path = manifest_path(path_or_dir)
    if not path.is_file():
        hint = missing_manifest_hint(path.parent) or (
            " (was the build interrupted? rerun `tcore shards build`)" if path.parent.is_dir() else "")
        raise ShardDirError(f"no shard manifest at {path}{hint}")
    manifest = read_json(path)
    validate_manifest(manifest, str(path))
    if check_files:
        for shard in manifest["shards"]:
            for key in ("tar", "index"):
                if not (path.parent / shard[key]).is_file():
                    raise ShardDirError(f"{path}: listed {key} file {shard[key]} is missing")
    return manifest


def shard_paths(manifest_file_or_dir) -> list[tuple[Path, Path]]:
    """(tar, index) absolute paths of every shard, in manifest order."""
    path = manifest_path(manifest_file_or_dir)
    manifest = load_manifest(path)
    return [(path.parent / s["tar"], path.parent / s["index"]) for s in manifest["shards"]]


def merge_manifest_parts(parts: list[dict], where: list[str]) -> dict:
    """Join node manifests of one build: same options and classes, disjoint shards."""
    if not parts:
        raise ShardDirError("no node manifests to merge")
    parts = [{**part, "options": with_default_options(part["options"])} for part in parts]
    first = parts[0]     # (a node may have finished under a tcore that recorded fewer options)
    for part, name in zip(parts[1:], where[1:]):
        for key in ("options", "classes", "kind", "codec", "frames", "short_side"):
            if part[key] != first[key]:
                raise ShardDirError(f"{name}: {key} differs from {where[0]}; these are not parts of one build")
    shards, seen = [], set()
    for part, name in zip(parts, where):
        for shard in part["shards"]:
            if shard["tar"] in seen:
                raise ShardDirError(f"{name}: shard {shard['tar']} appears in two node manifests")
            seen.add(shard["tar"])
            shards.append(shard)
    return make_manifest(kind=first["kind"], frames=first["frames"], codec=first["codec"],
                         short_side=first["short_side"], classes=first["classes"], shards=shards,
                         failures=sum(p["failures"] for p in parts), options=first["options"])
