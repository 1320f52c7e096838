"""DALI reads what the shard builder writes: the webdataset reader accepts our index files,
and the CPU video decoder decodes every VP9 (and MJPEG/MKV) clip to the frame count and size
its json records."""
import io
import json

import av
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from tcore.preprocess.manifest import load_manifest, shard_paths
from tcore.preprocess.shards import build_shards
from shard_files import read_tar


def _decode_every_sample(shard_dir, clip_ext):
    """(decoded frames array, json dict) for every sample, read through DALI's webdataset
    reader with our .idx files and decoded by fn.decoders.video on the CPU."""
    manifest = load_manifest(shard_dir)
    tars, indices = zip(*((str(t), str(i)) for t, i in shard_paths(shard_dir)))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        clip, meta = fn.readers.webdataset(paths=list(tars), index_paths=list(indices), ext=[clip_ext, "json"],
                                           dtypes=[types.UINT8, types.UINT8], random_shuffle=False,
                                           name="reader")
        return fn.decoders.video(clip, device="cpu"), meta

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == manifest["total_samples"]
    results = []
    for _ in range(manifest["total_samples"]):
        frames, meta = pipe.run()
        results.append((np.array(frames[0]), json.loads(np.array(meta[0]).tobytes())))
    return results


def test_dali_decodes_every_vp9_clip(synth_shards, synth_root):
    manifest = load_manifest(synth_shards)
    results = _decode_every_sample(synth_shards, "webm")
    assert len(results) == manifest["total_samples"] == 12
    sources = set()
    for frames, meta in results:
        assert frames.shape == (meta["frames"], meta["height"], meta["width"], 3) == (20, 128, 160, 3)
        assert frames.dtype == np.uint8 and 20 < frames.mean() < 235  # real picture content
        sources.add(meta["source"])
        # DALI sees the picture of the source frames (same colour range and matrix). Its
        # YUV->RGB comes out ~1-1.5 levels brighter than libswscale's on the same clip.
        with av.open(str(synth_root / "train" / meta["source"])) as container:
            source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        for t in (0, 19):
            reference = source[meta["frame_indices"][t]].astype(np.float32)
            assert np.abs(frames[t].astype(np.float32) - reference).mean() < 6.0
            assert abs(frames[t].mean() - reference.mean()) < 2.5
    assert len(sources) == 12  # each sample once, in one epoch


@pytest.fixture(scope="module")
def mjpeg_shards(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mjpeg") / "shards"
    build_shards(synth_root / "train", out, frames=8, short_side=64, codec="mjpeg", samples_per_shard=6,
                 progress=False)
    return out


def test_dali_decodes_mjpeg_clips_from_mkv(mjpeg_shards):
    manifest = load_manifest(mjpeg_shards)
    assert (manifest["codec"], manifest["clip_ext"]) == ("mjpeg", "mkv")
    results = _decode_every_sample(mjpeg_shards, "mkv")
    assert len(results) == 12
    clips = {json.loads(sample["json"])["source"]: sample["mkv"]
             for tar, _ in shard_paths(mjpeg_shards) for sample in read_tar(tar).values()}
    for frames, meta in results:
        assert frames.shape == (8, meta["height"], meta["width"], 3) == (8, 64, 80, 3)
        # the full-range (yuvj) JPEG frames come out as FFmpeg decodes the same clip
        with av.open(io.BytesIO(clips[meta["source"]])) as container:
            ffmpeg = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        for t in (0, 7):
            reference = ffmpeg[t].astype(np.float32)
            # measured (2026-11-29): 3.5 levels apart on average (chroma upsampling), the
            # means within 0.7; a limited/full range mix-up stretches levels by 16% (200 -> 214)
            assert np.abs(frames[t].astype(np.float32) - reference).mean() < 5.0, meta["source"]
            assert abs(frames[t].mean() - reference.mean()) < 1.5, meta["source"]
