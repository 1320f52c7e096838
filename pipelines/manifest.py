"""The shard directories a loader reads: manifests merged and checked at start-up.

Beyond parsing manifest.json (the contract of docs/ARCHITECTURE.md), this checks what would
otherwise fail deep inside DALI without a useful name: missing tar or index files, and tars
shorter than their index says (a truncated copy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from tcore.preprocess.index import read_index
from tcore.preprocess.manifest import load_manifest, manifest_path

VIDEO_CODECS_ON_CPU = ("vp9", "vp8", "mjpeg")
FRAME_CODEC = "jpegs"  # video shards holding T separate JPEG frames (tcore shards --codec jpegs)


@dataclass
class ShardSet:
    kind: str               # "video" (clips), "frames" (T JPEGs per video) or "image"
    tars: list[str] = field(default_factory=list)
    indices: list[str] = field(default_factory=list)
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


def _last_index_end(index_path: str) -> int:
    """End offset of the last component listed in a DALI (wds2idx) index file."""
    return max((offset + size for sample in read_index(index_path)
                for _ext, offset, size, _name in sample), default=0)


def check_shard_files(tar: str, index: str) -> None:
    if not os.path.isfile(tar):
        raise FileNotFoundError(f"shard {tar}: file is missing")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"shard {tar}: index {index} is missing (rebuild the shards or "
                                "run DALI's wds2idx)")
    try:
        end = _last_index_end(index)
    except (ValueError, OSError) as error:
        raise ValueError(f"shard {tar}: index {index} is unreadable ({error})") from None
    size = os.path.getsize(tar)
    if end > size:
        raise ValueError(f"shard {tar}: truncated or corrupt ({size} bytes, its index expects "
                         f"at least {end})")


def _layout(manifest: dict) -> str:
    """How stage B reads a shard directory's samples: one clip, T JPEG frames, or one image."""
    if manifest["kind"] == "video" and manifest["codec"] == FRAME_CODEC:
        return "frames"
    return manifest["kind"]


def load_shard_set(manifests) -> ShardSet:
    """One or several shard directories (or manifest paths), all of the same kind."""
    if isinstance(manifests, (str, os.PathLike)):
        manifests = [manifests]
    loaded = [read_manifest(m) for m in manifests]
    if not loaded:
        raise ValueError("no shard directories given")
    kinds = {_layout(m) for m in loaded}
    if len(kinds) > 1:
        raise ValueError(f"cannot mix shard layouts {sorted(kinds)} in one loader: "
                         + ", ".join(m["_dir"] for m in loaded))
    shard_set = ShardSet(kind=kinds.pop(), manifests=loaded)
    for manifest in loaded:
        for entry in manifest["shards"]:
            tar = os.path.join(manifest["_dir"], entry["tar"])
            index = os.path.join(manifest["_dir"], entry["index"])
            check_shard_files(tar, index)
            shard_set.tars.append(tar)
            shard_set.indices.append(index)
            shard_set.total_samples += int(entry["samples"])
        if manifest["clip_ext"] not in shard_set.extensions:
            shard_set.extensions.append(manifest["clip_ext"])
        shard_set.codecs.append(manifest["codec"])
        shard_set.frames.append(manifest.get("frames"))
    if shard_set.total_samples == 0:
        raise ValueError("the shard directories hold no samples: "
                         + ", ".join(m["_dir"] for m in loaded))
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
            raise RuntimeError(
                f"{manifest['_dir']}: {manifest['codec']} shards cannot be decoded on the CPU "
                f"(DALI's CPU video decoder reads {', '.join(VIDEO_CODECS_ON_CPU)} only): "
                "rebuild them with `tcore shards build --codec vp9` or run on a GPU "
                "(video_decoder=auto or gpu)")
