"""The shard directories a loader reads: manifests merged and checked at start-up.

Beyond parsing manifest.json (the contract of docs/ARCHITECTURE.md), this checks what would
otherwise fail deep inside DALI without a useful name, or not fail at all: missing tar or
index files, tars shorter than their index says (a truncated copy), and an index that
disagrees with its manifest entry or its tar (a stale or swapped copy). Each is a
ShardSetError (a ShardDirError, as the shard builder's manifest errors are) naming the shard.
"""
from __future__ import annotations

import os
import tarfile
import warnings
from dataclasses import dataclass, field

from tcore.preprocess.errors import ShardDirError, TcoreWarning
from tcore.preprocess.index import read_index
from tcore.preprocess.manifest import holds_classes_in_order, load_manifest, manifest_path

VIDEO_CODECS_ON_CPU = ("vp9", "vp8", "mjpeg")
FRAME_CODEC = "jpegs"  # video shards holding T separate JPEG frames (tcore shards --codec jpegs)


class ShardSetError(ShardDirError, ValueError):
    """Shards a loader cannot read, found at start-up; the message names the shard or the
    directory. A ValueError too, as these checks raised before it existed."""


class ShardCodecError(ShardSetError, RuntimeError):
    """Video shards the decoder in use cannot read (a RuntimeError, as it was before)."""


REBUILD_HINT = ("rebuild the shard with `tcore shards build` (or its index with DALI's "
                "wds2idx); `tcore shards inspect --verify` lists what disagrees")


@dataclass
class ShardSet:
    kind: str               # "video" (clips), "frames" (T JPEGs per video) or "image"
    tars: list[str] = field(default_factory=list)
    indices: list[str] = field(default_factory=list)
    shard_samples: list[int] = field(default_factory=list)     # per tar, as its index says
    extensions: list[str] = field(default_factory=list)   # clip / image component names
    codecs: list[str] = field(default_factory=list)
    frames: list[int | None] = field(default_factory=list)
    total_samples: int = 0
    manifests: list[dict] = field(default_factory=list)

    def samples_in_shard(self, shard_id: int, num_shards: int) -> int:
        """Samples DALI's reader gives shard `shard_id` (contiguous split of the list)."""
        n = self.total_samples
        return n * (shard_id + 1) // num_shards - n * shard_id // num_shards


def read_manifest(path) -> dict:
    """The validated manifest (the shard builder's own reader), plus its directory as `_dir`."""
    manifest = load_manifest(path)
    manifest["_dir"] = str(manifest_path(path).parent.resolve())
    return manifest


def _tar_member_at(handle, data_offset: int) -> tuple[str, int] | None:
    """(name, size) from the tar header just before `data_offset`, None if there is none."""
    if data_offset < tarfile.BLOCKSIZE:
        return None
    handle.seek(data_offset - tarfile.BLOCKSIZE)
    try:
        info = tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), tarfile.ENCODING,
                                       "surrogateescape")
    except tarfile.HeaderError:
        return None
    return info.name, info.size


def _index_disagrees_with_tar(tar: str, samples) -> str | None:
    """What the tar holds at the index's first and last component, where that is not what
    the index says (None when both agree). Two header reads, so it is cheap at start-up for
    any number of shards, and it catches an index copied from another shard or left from an
    earlier build (`tcore shards inspect --verify` compares every member)."""
    ends = [samples[0][0], samples[-1][-1]] if samples else []
    with open(tar, "rb") as handle:
        for _ext, offset, size, name in ends:
            found = _tar_member_at(handle, offset)
            # USTAR keeps 100 bytes of a name: a longer one is compared by that prefix.
            if found is None or found[1] != size or not (
                    found[0] == name or (len(found[0]) >= 99 and name.startswith(found[0]))):
                held = "no tar header" if found is None else f"{found[0]} ({found[1]} bytes)"
                return (f"its index lists {name} ({size} bytes) at offset {offset}, the tar "
                        f"has {held} there")
    return None


def check_shard_files(tar: str, index: str, samples: int | None = None) -> None:
    """The shard's tar and index exist and agree: the index lists `samples` samples (the
    manifest's count, when given), the tar is long enough for them, and its members at the
    index's first and last offsets are the ones the index names."""
    if not os.path.isfile(tar):
        raise FileNotFoundError(f"shard {tar}: file is missing")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"shard {tar}: index {index} is missing (rebuild the shards or "
                                "run DALI's wds2idx)")
    try:
        listed = read_index(index)
    except (ValueError, OSError) as error:
        raise ShardSetError(f"shard {tar}: index {index} is unreadable ({error})") from None
    if samples is not None and len(listed) != samples:
        # More would repeat samples in a one-pass epoch; fewer would drop some.
        raise ShardSetError(f"shard {tar}: manifest.json says {samples} samples, its index "
                            f"{index} lists {len(listed)}: {REBUILD_HINT}")
    end = max((offset + size for sample in listed for _ext, offset, size, _name in sample),
              default=0)
    size = os.path.getsize(tar)
    if end > size:
        raise ShardSetError(f"shard {tar}: truncated or corrupt ({size} bytes, its index "
                            f"expects at least {end})")
    mismatch = _index_disagrees_with_tar(tar, listed)
    if mismatch:
        raise ShardSetError(f"shard {tar}: index {index} does not match the tar ({mismatch}): "
                            f"{REBUILD_HINT}")


def _layout(manifest: dict) -> str:
    """How stage B reads a shard directory's samples: one clip, T JPEG frames, or one image."""
    if manifest["kind"] == "video" and manifest["codec"] == FRAME_CODEC:
        return "frames"
    return manifest["kind"]


def load_shard_set(manifests) -> ShardSet:
    """One or several shard directories (or manifest paths), all of the same kind; a
    ShardSet already loaded is returned as it is (its files are not read again)."""
    if isinstance(manifests, ShardSet):
        return manifests
    if isinstance(manifests, (str, os.PathLike)):
        manifests = [manifests]
    loaded = [read_manifest(m) for m in manifests]
    if not loaded:
        raise ShardSetError("no shard directories given")
    # One directory named twice would be read twice an epoch, each sample seen twice.
    seen = [os.path.realpath(m["_dir"]) for m in loaded]
    repeated = sorted({m["_dir"] for m, real in zip(loaded, seen) if seen.count(real) > 1})
    if repeated:
        raise ShardSetError(f"{', '.join(repeated)}: the same shard directory given more than "
                            "once (its samples would be read twice an epoch)")
    kinds = {_layout(m) for m in loaded}
    if len(kinds) > 1:
        raise ShardSetError(f"cannot mix shard layouts {sorted(kinds)} in one loader: "
                            + ", ".join(m["_dir"] for m in loaded))
    shard_set = ShardSet(kind=kinds.pop(), manifests=loaded)
    for manifest in loaded:
        for entry in manifest["shards"]:
            tar = os.path.join(manifest["_dir"], entry["tar"])
            index = os.path.join(manifest["_dir"], entry["index"])
            check_shard_files(tar, index, int(entry["samples"]))
            shard_set.tars.append(tar)
            shard_set.indices.append(index)
            shard_set.shard_samples.append(int(entry["samples"]))
            shard_set.total_samples += int(entry["samples"])
        if manifest["clip_ext"] not in shard_set.extensions:
            shard_set.extensions.append(manifest["clip_ext"])
        shard_set.codecs.append(manifest["codec"])
        shard_set.frames.append(manifest.get("frames"))
    if shard_set.total_samples == 0:
        raise ShardSetError("the shard directories hold no samples: "
                            + ", ".join(m["_dir"] for m in loaded))
    in_order = [m["_dir"] for m in loaded if holds_classes_in_order(m)]
    if in_order:
        # The reader streams shards in order through a buffer of `shuffle_buffer` samples.
        warnings.warn(f"{', '.join(in_order)}: the shards hold their inputs in sorted order, "
                      "so in class order for SRC/<class>/ folders (built with --no-shuffle, or "
                      "by a tcore before shard builds shuffled them), and each batch then holds "
                      "only a few classes; rebuild them with `tcore shards build` (shuffled by "
                      "default)", TcoreWarning)
    return shard_set


def decodes_video_on_gpu(shard_set: ShardSet, on_gpu: bool, video_decoder: str) -> bool:
    """Whether clips go to NVDEC: asked for, or ("auto") a codec the CPU decoder cannot read."""
    if not on_gpu or shard_set.kind != "video" or video_decoder == "cpu":
        return False
    if video_decoder == "gpu":
        return True
    return any(codec not in VIDEO_CODECS_ON_CPU for codec in shard_set.codecs)


def check_codecs_for_device(shard_set: ShardSet, decodes_on_gpu: bool) -> None:
    """Refuse at start-up video shards that the decoder in use cannot read."""
    if decodes_on_gpu or shard_set.kind != "video":
        return
    for manifest in shard_set.manifests:
        if manifest["codec"] not in VIDEO_CODECS_ON_CPU:
            raise ShardCodecError(
                f"{manifest['_dir']}: {manifest['codec']} shards cannot be decoded on the CPU "
                f"(DALI's CPU video decoder reads {', '.join(VIDEO_CODECS_ON_CPU)} only): "
                "rebuild them with `tcore shards build --codec vp9` or run on a GPU "
                "(video_decoder=auto or gpu)")
