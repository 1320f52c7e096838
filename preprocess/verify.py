"""`tcore shards inspect`: summarise a shard directory and, with verify, decode every sample."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

from tcore.preprocess.errors import BadInput
from tcore.preprocess.index import read_index
from tcore.preprocess.manifest import (holds_classes_in_order, load_manifest, manifest_path,
                                       with_default_options)
from tcore.preprocess.video import FRAME_CODECS, probe_clip, split_jpeg_frames


def _index_matches_tar(tar_path: Path, samples) -> str | None:
    """None when the index lists exactly the tar's members at their data offsets."""
    try:
        with tarfile.open(tar_path) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as err:  # a cut-off tar passes is_tarfile, then fails here
        return f"truncated or corrupt tar ({err})"
    listed = [(name, offset, size) for components in samples for _, offset, size, name in components]
    if members != listed:
        first = next((i for i, (a, b) in enumerate(zip(listed, members)) if a != b),
                     min(len(listed), len(members)))
        at = (f"; member {first + 1}: index {_member_text(listed, first)}, tar "
              f"{_member_text(members, first)}")
        return (f"index does not match the tar ({len(listed)} indexed members, {len(members)} "
                f"in tar{at})")
    return None


def _member_text(members: list, index: int) -> str:
    if index >= len(members):
        return "none"
    name, offset, size = members[index]
    return f"{name} at byte {offset}, {size} bytes"


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (OSError, ValueError) as err:
        raise BadInput(f"image does not decode ({err})") from err


def _check_sample(manifest: dict, components: dict[str, bytes]) -> None:
    """Decode one sample and compare it with its json; raises BadInput on any mismatch."""
    clip_ext = manifest["clip_ext"]
    for ext in (clip_ext, "json", "cls"):
        if ext not in components:
            raise BadInput(f"missing component .{ext}")
    try:
        meta = json.loads(components["json"])
    except ValueError as err:
        raise BadInput(f"json does not parse ({err})") from err
    if components["cls"].decode(errors="replace").strip() != str(meta.get("label")):
        raise BadInput(f"cls {components['cls']!r} disagrees with json label {meta.get('label')}")
    if manifest["kind"] == "video" and manifest["codec"] in FRAME_CODECS:
        images = split_jpeg_frames(components[clip_ext], meta.get("frame_bytes") or [])
        sizes = {_image_size(image) for image in images}
        count, (width, height) = len(images), (sizes.pop() if len(sizes) == 1 else (None, None))
        expected = (manifest["frames"], meta.get("width"), meta.get("height"))
        if (count, width, height) != expected:
            raise BadInput(f"frames decode to {count} images of {width}x{height}, json/manifest "
                           f"say {expected[0]} frames of {expected[1]}x{expected[2]}")
    elif manifest["kind"] == "video":
        count, width, height = probe_clip(components[clip_ext])
        expected = (manifest["frames"], meta.get("width"), meta.get("height"))
        if (count, width, height) != expected:
            raise BadInput(f"clip decodes to {count} frames of {width}x{height}, json/manifest say "
                           f"{expected[0]} frames of {expected[1]}x{expected[2]}")
    else:
        size = _image_size(components[clip_ext])
        if size != (meta.get("width"), meta.get("height")):
            raise BadInput(f"image is {size[0]}x{size[1]}, json says {meta.get('width')}x{meta.get('height')}")


def short_side_text(manifest: dict, stored: list[int] | None = None) -> str:
    """What the manifest's `short_side` (the --short-side option) says of the stored sizes:
    without allow_upscale sources are never enlarged, so it is only an upper bound.
    `stored`: the short sides a verify read from the samples, added when given."""
    option = manifest["short_side"]
    if option <= 0:
        text = "as the sources (not resized)"
    elif manifest["options"].get("allow_upscale"):
        text = f"{option} (sources resized up or down to it)"
    else:
        text = f"<= {option} (sources are not enlarged)"
    if stored:
        low, high = min(stored), max(stored)
        text += f", stored {low}" if low == high else f", stored {low}..{high}"
    return text


def order_text(manifest: dict) -> str:
    """The order the shards hold their inputs in, as `inspect` prints it."""
    if holds_classes_in_order(manifest):
        return "sorted, so in class order: batches hold few classes (rebuild to shuffle)"
    seed = with_default_options(manifest["options"])["shuffle_seed"]
    return "sorted" if seed is None else f"shuffled (seed {seed})"


def inspect_shards(out, verify: bool = False, progress=None) -> dict:
    """Summary of a shard directory: counts, sizes, codec, frames per sample; with `verify`,
    every sample is read through the index and decoded, and `problems` lists the ones
    that fail ({"tar", "key", "error"}). `progress(n)` is called per sample verified.
    `short_side` is a text (short_side_text), `short_side_option` the option's number."""
    manifest = load_manifest(out, check_files=True)
    out = manifest_path(out).parent  # `out` may name the manifest file itself
    report = {"directory": str(out), "kind": manifest["kind"], "codec": manifest["codec"],
              "frames": manifest["frames"], "short_side": short_side_text(manifest),
              "short_side_option": manifest["short_side"],
              "classes": len(manifest["classes"]), "shards": len(manifest["shards"]),
              "samples": manifest["total_samples"], "bytes": manifest["total_bytes"],
              "bytes_per_sample": manifest["total_bytes"] / max(1, manifest["total_samples"]),
              "failures": manifest["failures"], "order": order_text(manifest),
              "verified": verify, "problems": []}
    # Without decoding anything: a shard whose size is not the one the build recorded (cut
    # short by a copy, say) is named here too.
    for shard in manifest["shards"]:
        size = (out / shard["tar"]).stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            report["problems"].append({"tar": shard["tar"], "key": None, "error":
                                       f"{size} bytes, the build wrote {shard['bytes']} "
                                       "(truncated or changed since)"})
    # A tar the manifest does not list is never read by the loader: its samples are left out
    # of training without a word (shards copied in from another build, an edited manifest).
    listed = {shard["tar"] for shard in manifest["shards"]}
    for tar in sorted(p.name for p in out.glob("*.tar") if p.name not in listed):
        report["problems"].append({"tar": tar, "key": None, "error":
                                   "not listed in manifest.json, so never trained on (a build's "
                                   "own shards are listed; merge a node build's manifests with "
                                   "`tcore shards merge-manifest`)"})
    if not verify:
        return report
    per_class, stored = Counter(), []
    for shard in manifest["shards"]:
        tar_path = out / shard["tar"]
        try:
            samples = read_index(out / shard["index"])
        except ValueError as err:
            report["problems"].append({"tar": shard["tar"], "key": None, "error": str(err)})
            continue
        mismatch = _index_matches_tar(tar_path, samples) if tarfile.is_tarfile(tar_path) else "not a tar file"
        if mismatch:
            report["problems"].append({"tar": shard["tar"], "key": None, "error": mismatch})
        if len(samples) != shard["samples"]:
            report["problems"].append({"tar": shard["tar"], "key": None, "error":
                                       f"manifest says {shard['samples']} samples, index lists {len(samples)}"})
        with open(tar_path, "rb") as handle:
            for components in samples:
                key = components[0][3].split(".", 1)[0]
                data = {}
                for ext, offset, size, _ in components:
                    handle.seek(offset)
                    data[ext] = handle.read(size)
                try:
                    short = [ext for ext, _, size, _ in components if len(data[ext]) != size]
                    if short:
                        raise BadInput(f"the tar ends inside .{short[0]} (truncated tar)")
                    _check_sample(manifest, data)
                    meta = json.loads(data["json"])
                    per_class[meta["class"]] += 1
                    stored.append(min(meta["width"], meta["height"]))
                except BadInput as err:
                    report["problems"].append({"tar": shard["tar"], "key": key, "error": str(err)})
                if progress is not None:
                    progress(1)
    report["per_class"] = dict(sorted(per_class.items()))
    report["short_side"] = short_side_text(manifest, stored)
    return report
