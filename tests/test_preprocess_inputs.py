"""Awkward but real inputs of the shard builder, through real files and codecs: videos that
start after time 0, still images posing as videos, other pixel formats, odd sizes and
display rotations, EXIF-rotated and 16-bit images (checked
against what DALI decodes), hidden folders, symbolic links (broken, to folders, in loops),
inputs listed twice, folders in a list and bad numbers in a Kinetics CSV."""
import io
import json
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from tcore.cli import main as cli
from tcore.preprocess.discover import discover_class_folders, discover_list
from tcore.preprocess.errors import BadInput, TcoreWarning
from tcore.preprocess.manifest import shard_paths
from tcore.preprocess.shards import build_shards
from tcore.preprocess.video import read_clip
from shard_files import read_tar

EXIF_ORIENTATION = 0x0112


def _offset_video(path: Path, encoder: str, frames: int = 20, first_pts: int = 5) -> None:
    """`frames` frames at 10 fps whose first frame is at first_pts / 10 s (not 0)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=10)
        stream.width, stream.height = 64, 48
        for index in range(frames):
            picture = np.zeros((48, 64, 3), np.uint8)
            picture[..., 0] = index * 10
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = first_pts + index, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _gradient(width: int, height: int) -> Image.Image:
    """Smooth, asymmetric RGB content (red grows to the right, green downwards), so that a
    rotation or flip shows in the pixels and JPEG loss stays small."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return Image.fromarray((np.stack([x, y, 0.5 + 0 * x], -1) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def video_build(tmp_path_factory):
    """A video folder with WebM and MKV files whose video starts at 0.5 s, a JPEG named
    .mp4, a PNG, and a video in a hidden subfolder; built with T=8."""
    src = tmp_path_factory.mktemp("videos") / "src"
    (src / "a" / ".cache").mkdir(parents=True)
    _offset_video(src / "a" / "offset.webm", "libvpx-vp9")
    _offset_video(src / "a" / "offset.mkv", "mpeg4")
    _gradient(64, 48).save(src / "a" / "picture.mp4", format="JPEG")
    _gradient(64, 48).save(src / "a" / "still.png")
    _offset_video(src / "a" / ".cache" / "hidden.webm", "libvpx-vp9", frames=3)
    out = src.parent / "out"
    manifest = build_shards(src, out, frames=8, short_side=0, progress=False)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    metas = [json.loads(c["json"]) for c in read_tar(out / manifest["shards"][0]["tar"]).values()]
    return src, manifest, {f["source"]: f["error"] for f in failures}, {m["source"]: m for m in metas}


def test_webm_and_mkv_whose_video_starts_after_zero_are_not_truncated(video_build):
    _, _, failures, metas = video_build
    assert "a/offset.webm" not in failures and "a/offset.mkv" not in failures
    for source in ("a/offset.webm", "a/offset.mkv"):
        meta = metas[source]
        assert (meta["source_frames"], meta["frames"], meta["fps"]) == (20, 8, 10.0)
        assert meta["duration"] == pytest.approx(2.5)  # Matroska counts from 0


@pytest.mark.parametrize("ext", ["webm", "mkv"])
def test_cut_offset_video_is_truncated_and_the_message_gives_the_true_end(video_build, tmp_path, ext):
    data = (video_build[0] / "a" / f"offset.{ext}").read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(cut)) as container:
        end = max(frame.time for frame in container.decode(video=0)) + 0.1
    assert end < 2.0
    with pytest.raises(BadInput, match=rf"truncated video: frames end at {end:.2f} s of the 2\.50 s"):
        read_clip(str(cut), 8, 0)


def _video_with_longer_audio(path: Path, audio_seconds: float) -> None:
    """2 s of VP9 (20 frames at 10 fps) muxed with `audio_seconds` of Opus silence."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9", rate=10)
        video.width, video.height = 64, 48
        audio = container.add_stream("libopus", rate=48000)
        audio.layout = "mono"
        for index in range(20):
            picture = np.full((48, 64, 3), index * 10, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode(None))
        for index in range(int(audio_seconds * 50)):          # 20 ms frames
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 48000, index * 960
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


@pytest.mark.parametrize("ext", ["webm", "mkv"])
def test_an_audio_track_longer_than_the_video_is_not_truncation(tmp_path, ext):
    """A whole WebM / MKV whose audio runs 1.5 s past its 2 s of video (Kinetics downloads
    have such files) was refused as "truncated video: frames end at 2.00 s of the 3.52 s the
    container declares": the container's duration spans the audio. The video track's own
    DURATION tag is used; the same file cut in half is still caught by it."""
    whole = tmp_path / f"long_audio.{ext}"
    _video_with_longer_audio(whole, 3.5)
    with av.open(str(whole)) as container:
        assert container.duration / av.time_base > 3.4     # the container spans the audio
    clip = read_clip(str(whole), 8, 0)
    assert clip.source_frames == 20 and clip.source_duration == pytest.approx(2.0)
    cut = tmp_path / f"cut.{ext}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"truncated video: frames end at [01]\.\d\d s of the "
                                       r"2\.00 s"):
        read_clip(str(cut), 8, 0)


def test_a_stale_duration_eng_tag_is_not_the_tracks_duration(tmp_path):
    """mkvmerge's DURATION-eng, which FFmpeg copies unchanged from a source it re-muxes, can
    name the source's length; the DURATION tag FFmpeg's muxer writes is the track's. A 2 s
    clip carrying a stale 10 s DURATION-eng is whole, not "truncated at 2.00 s of 10 s"."""
    path = tmp_path / "remuxed.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height = 64, 48
        stream.metadata["DURATION-eng"] = "00:00:10.000000000"
        for index in range(20):
            picture = np.full((48, 64, 3), index * 10, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.streams.video[0].metadata["DURATION-eng"].startswith("00:00:10")
    clip = read_clip(str(path), 8, 0)
    assert clip.source_frames == 20 and clip.source_duration == pytest.approx(2.0)


def test_a_text_file_in_a_video_folder_is_not_a_video(tmp_path):
    """FFmpeg's tty demuxer reads a text file of some size (a README.txt, a list of paths
    made inside the data folder) as a "video" of terminal text; it became a sample."""
    text = tmp_path / "README.txt"
    text.write_text("A dataset of videos, one folder per class.\n" * 40)
    with av.open(str(text)) as container:                   # what FFmpeg makes of it
        assert container.format.name == "tty" and container.streams.video
    with pytest.raises(BadInput, match=r"not a video: text \(FFmpeg reads it with its tty"):
        read_clip(str(text), 8, 0)


def test_a_cut_avi_is_truncated_by_the_frame_count_in_its_header(tmp_path):
    """A cut-off AVI decodes cleanly up to the cut and FFmpeg takes its duration from what
    it found, so the duration check passed it and it became a sample; the frame count in
    its header gives it away. The whole file passes."""
    whole = tmp_path / "whole.avi"
    rng = np.random.default_rng(0)
    with av.open(str(whole), "w") as container:      # noise: the frames outweigh the header
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height = 64, 48
        for _ in range(24):
            picture = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    assert len(read_clip(str(whole), 8, 0).frames) == 8
    data = whole.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])           # the index, at the end, is gone too
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 24
    with pytest.raises(BadInput, match=r"truncated video: \d+ of the 24 frames its header declares"):
        read_clip(str(cut), 8, 0)


def test_a_still_image_in_a_video_folder_is_not_a_video(video_build, tmp_path):
    _, manifest, failures, metas = video_build
    assert set(failures) == {"a/picture.mp4", "a/still.png"}
    assert "not a video" in failures["a/picture.mp4"] and "jpeg_pipe" in failures["a/picture.mp4"]
    assert "not a video" in failures["a/still.png"]
    assert set(metas) == {"a/offset.webm", "a/offset.mkv"} and manifest["total_samples"] == 2
    _gradient(64, 48).save(tmp_path / "frame.jpg")  # opened by FFmpeg's image2 demuxer
    with pytest.raises(BadInput, match="not a video"):
        read_clip(str(tmp_path / "frame.jpg"), 8, 0)


def test_a_folder_of_images_built_as_videos_points_to_kind_image(tmp_path):
    from tcore.preprocess.shards import BuildError

    for k in range(2):
        (tmp_path / "src" / f"c{k}").mkdir(parents=True)
        _gradient(64, 48).save(tmp_path / "src" / f"c{k}" / f"im{k}.jpg")
    with pytest.raises(BuildError, match=r"all 2 inputs failed \(every one a still image: for a "
                                         r"folder of images, build with --kind image\)"):
        build_shards(tmp_path / "src", tmp_path / "out", frames=4, short_side=48, progress=False)
    built = build_shards(tmp_path / "src", tmp_path / "images", kind="image", short_side=48,
                         progress=False)
    assert built["total_samples"] == 2


def _levels_picture(levels) -> np.ndarray:
    """64x48 RGB of grey vertical bars, one per level (wide enough for 4:2:0 chroma)."""
    picture = np.zeros((48, 64, 3), np.uint8)
    for k, level in enumerate(levels):
        picture[:, 16 * k:16 * (k + 1)] = level
    return picture


def test_a_full_range_yuv420p_source_keeps_its_levels(tmp_path):
    """VP9 marks full range with a flag, not with FFmpeg's yuvj formats: the decoded frames are
    yuv420p + colour range JPEG. Read as limited range they would come out stretched (16 -> 0,
    64 -> 53, 200 -> 212): the stored clip must hold the source's grey levels."""
    from av.video.reformatter import ColorRange, Colorspace

    from tcore.preprocess.video import encode_clip

    levels = [16, 64, 200, 240]
    path = tmp_path / "full_range.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.color_range = ColorRange.JPEG
        stream.codec_context.colorspace = Colorspace.ITU601
        stream.options = {"crf": "4", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for index in range(4):
            frame = av.VideoFrame.from_ndarray(_levels_picture(levels), format="rgb24").reformat(
                format="yuv420p", dst_color_range=ColorRange.JPEG, dst_colorspace=Colorspace.ITU601)
            frame.color_range, frame.pts, frame.time_base = ColorRange.JPEG, index, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:  # the case this test is about
        first = next(container.decode(video=0))
        assert (first.format.name, first.color_range) == ("yuv420p", ColorRange.JPEG)
    clip = read_clip(str(path), 4, 0)
    with av.open(io.BytesIO(encode_clip(clip.frames, "vp9", gop=4))) as container:
        stored = [frame.reformat(format="rgb24", src_color_range=ColorRange.MPEG,
                                 src_colorspace=Colorspace.ITU601).to_ndarray()
                  for frame in container.decode(video=0)]
    assert len(stored) == 4
    for picture in stored:
        bars = [float(picture[8:40, 16 * k + 4:16 * k + 12].mean()) for k in range(len(levels))]
        np.testing.assert_allclose(bars, levels, atol=3.0)


def _gradient_video(path: Path, encoder: str, pix_fmt: str, width: int = 64, height: int = 48,
                    rotation: int | None = None) -> None:
    """6 frames of `_gradient` at 10 fps, coded nearly losslessly in `pix_fmt`."""
    picture = np.asarray(_gradient(width, height))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if encoder == "libx264":
            stream.options = {"qp": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index in range(6):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


SOURCE_FORMATS = {  # file: (encoder, pixel format, width, height, display rotation)
    "ten_bit.mp4": ("libx264", "yuv420p10le", 64, 48, None),
    "four_four_four.mp4": ("libx264", "yuv444p", 64, 48, None),
    "gray.mkv": ("ffv1", "gray", 64, 48, None),
    "alpha.mov": ("png", "rgba", 64, 48, None),
    "odd_size.mkv": ("ffv1", "yuv420p", 65, 49, None),
    "rotated.mp4": ("libx264", "yuv420p", 64, 48, 90),
}


def test_sources_in_other_pixel_formats_sizes_and_rotations_keep_their_pixels(tmp_path):
    """10-bit, 4:4:4, gray and RGBA sources become 8-bit 4:2:0 clips of the same picture;
    an odd size is rounded down to even; a display rotation is not applied (frames are stored
    as coded, as PyAV decodes them)."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for name, (encoder, pix_fmt, width, height, rotation) in SOURCE_FORMATS.items():
        _gradient_video(src / name, encoder, pix_fmt, width, height, rotation)
    with av.open(str(src / "rotated.mp4")) as container:  # the case this test is about
        assert next(container.decode(video=0)).rotation == 90
    out = tmp_path / "out"
    manifest = build_shards(src.parent, out, frames=4, short_side=0, progress=False)
    assert manifest["total_samples"] == len(SOURCE_FORMATS) and manifest["failures"] == 0
    samples = {json.loads(c["json"])["source"]: c
               for c in read_tar(out / manifest["shards"][0]["tar"]).values()}
    expected = np.asarray(_gradient(64, 48), np.float32)
    for name, (_, pix_fmt, _, _, _) in SOURCE_FORMATS.items():
        sample = samples[f"a/{name}"]
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == (64, 48), name
        with av.open(io.BytesIO(sample["webm"])) as container:
            frames = [f.to_ndarray(format="rgb24").astype(np.float32)
                      for f in container.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (48, 64, 3), name
        if pix_fmt == "gray":   # one channel: the luma of the gradient, in all three
            luma = expected @ np.array([0.299, 0.587, 0.114], np.float32)
            assert np.abs(frames[0] - luma[..., None]).mean() < 4.0, name
        else:
            assert np.abs(frames[0] - expected).mean() < 4.0, name


def test_frames_that_do_not_decode_are_not_chosen(tmp_path):
    """An H.264 file cut inside a GOP: its first 7 packets reference a keyframe that is gone,
    so the decoder drops them (27 packets, 20 frames). The T frames must be spread over the 20
    frames that decode, not over the 27 packets."""
    path = tmp_path / "cut_gop.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "10", "keyint_min": "10", "bf": "0", "sc_threshold": "0", "preset": "veryfast"}
        packets = []
        for index in range(30):
            frame = av.VideoFrame.from_ndarray(_levels_picture([index * 8] * 4), format="rgb24")
            frame.pts = index
            packets += stream.encode(frame)
        packets += stream.encode(None)
        for packet in packets[3:]:
            container.mux(packet)
    clip = read_clip(str(path), 5, 0)
    assert clip.source_frames == 20
    assert clip.frame_indices == [0, 5, 10, 14, 19]  # round(linspace(0, 19, 5))
    # the chosen frames are source frames 10, 15, 20, 24, 29 (grey level 8 x index)
    greys = [float(frame.to_ndarray(format="rgb24").mean()) for frame in clip.frames]
    np.testing.assert_allclose(greys, [80, 120, 160, 192, 232], atol=4.0)


def test_files_in_hidden_subfolders_are_left_out(tmp_path):
    for name in ("c/ok/v.mp4", "c/.git/v.mp4", "c/ok/.tmp/v.mp4", "c/.v.mp4", "c/v.mp4", ".h/v.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    inputs = discover_class_folders(tmp_path)
    assert [s.relative for s in inputs.sources] == ["c/ok/v.mp4", "c/v.mp4"] and inputs.classes == ["c"]


def test_a_file_name_that_is_not_utf8_becomes_a_sample(tmp_path):
    """Linux file names are bytes; one that is not UTF-8 (a Latin-1 name from an old
    archive) is kept, its bytes escaped in the .json, and the shuffled order takes it too."""
    src = tmp_path / "src"
    for folder in ("a", "b"):
        (src / folder).mkdir(parents=True)
    _gradient(32, 24).save(src / "b" / "plain.jpg")
    latin1 = os.fsdecode("café.jpg".encode("latin-1"))
    _gradient(32, 24).save(src / "a" / latin1, format="JPEG")
    manifest = build_shards(src, tmp_path / "out", kind="image", progress=False)
    assert manifest["total_samples"] == 2 and manifest["failures"] == 0
    sources = sorted(json.loads(sample["json"])["source"]
                     for sample in read_tar(tmp_path / "out" / "shard-000000.tar").values())
    assert sources == [f"a/{latin1}", "b/plain.jpg"]


def test_kinetics_csv_with_a_bad_number_names_file_line_and_column(tmp_path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("label,youtube_id,time_start,time_end,split\n"
                        "juggling,abc,0,10,train\n"
                        "juggling,xyz,5,one,train\n")
    with pytest.raises(ValueError, match=rf"^{csv_file}:3: column time_end is 'one', not a number"):
        discover_list(csv_file, video_root=tmp_path)


def _sources(out: Path, manifest: dict) -> list[str]:
    return sorted(json.loads(sample["json"])["source"] for shard in manifest["shards"]
                  for sample in read_tar(out / shard["tar"]).values())


def _errors(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return {row["source"]: row["error"] for row in rows}


def test_broken_links_fail_as_missing_and_symlinked_subfolders_are_followed_but_not_loops(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    (src / "c").mkdir(parents=True)
    store.mkdir()
    _offset_video(src / "c" / "a.mkv", "mpeg4", frames=2, first_pts=0)
    _offset_video(store / "b.mkv", "mpeg4", frames=2, first_pts=0)
    (src / "c" / "linked").symlink_to(store)                  # followed, as a class folder link is
    (src / "c" / "gone.mkv").symlink_to(tmp_path / "nowhere.mkv")    # inputs that fail
    (src / "c" / "knot.mkv").symlink_to("knot.mkv")
    (src / "c" / "self").symlink_to(".")                      # loops: neither followed nor hangs
    (src / "c" / "up").symlink_to("..")
    (src / "all").symlink_to(".")                             # a "class folder" that is SRC
    out = tmp_path / "out"
    manifest = build_shards(src, out, frames=2, short_side=0, progress=False)
    assert manifest["classes"] == ["c"] and manifest["failures"] == 2
    assert _sources(out, manifest) == ["c/a.mkv", "c/linked/b.mkv"]
    assert _errors(out) == {
        "c/gone.mkv": f"file not found (a broken symbolic link to {tmp_path / 'nowhere.mkv'})",
        "c/knot.mkv": "file not found (a broken symbolic link to knot.mkv)"}


def test_a_broken_class_link_and_loose_files_are_warned_of(tmp_path):
    """A class folder that is a broken link vanished without a word, shifting every later
    class's label; a video directly in SRC was ignored without a word. Warnings, not
    refusals: a broken link there may as well have been a file (a README link)."""
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    _offset_video(src / "b" / "y.mkv", "mpeg4", frames=2, first_pts=0)
    _offset_video(src / "loose.mkv", "mpeg4", frames=2, first_pts=0)
    with pytest.warns(TcoreWarning, match=r"src: 1 file\(s\) outside class folders, not inputs "
                                          r"\(e.g. loose.mkv\)"):
        assert discover_class_folders(src).classes == ["b"]
    (src / "loose.mkv").unlink()
    (src / "a").symlink_to(tmp_path / "gone")
    with pytest.warns(TcoreWarning, match=r"src/a: a broken symbolic link \(to .*gone\) where "
                                          r"class folders are: left out; if it was a class, "
                                          r"every later class's label shifts"):
        assert discover_class_folders(src).classes == ["b"]


def test_a_file_reached_twice_through_a_link_is_refused_naming_both_paths(tmp_path):
    """A link into a sibling folder or another class reaches a file twice: two samples of
    it, in two classes here. Refused as a list naming a file twice is."""
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
    _offset_video(src / "b" / "y.mkv", "mpeg4", frames=2, first_pts=0)
    _offset_video(src / "a" / "x.mkv", "mpeg4", frames=2, first_pts=0)
    (src / "a" / "to_b").symlink_to(src / "b")
    with pytest.raises(ValueError, match=r"src: a/to_b/y.mkv and b/y.mkv are one file \(.*y.mkv, "
                                         r"reached through a symbolic link\)"):
        discover_class_folders(src)


def test_a_list_line_naming_a_folder_or_a_broken_link_says_so(tmp_path):
    (tmp_path / "c").mkdir()
    _offset_video(tmp_path / "c" / "v.mkv", "mpeg4", frames=2, first_pts=0)
    (tmp_path / "c" / "gone.mkv").symlink_to(tmp_path / "nowhere.mkv")
    (tmp_path / "c" / "knot.mkv").symlink_to("knot.mkv")
    listing = tmp_path / "list.txt"
    listing.write_text("c/v.mkv\nc\nc/gone.mkv\nc/knot.mkv\nc/missing.mkv\n")
    out = tmp_path / "out"
    manifest = build_shards(None, out, list_file=listing, frames=2, short_side=0, progress=False)
    assert _sources(out, manifest) == ["c/v.mkv"]
    assert _errors(out) == {
        "c": "a directory, not a file (list the files in it)",
        "c/gone.mkv": f"file not found (a broken symbolic link to {tmp_path / 'nowhere.mkv'})",
        "c/knot.mkv": "file not found (a broken symbolic link to knot.mkv)",
        "c/missing.mkv": "file not found"}


def test_an_input_listed_twice_is_refused_naming_the_list_its_lines_and_the_file(tmp_path):
    """Twice in a list is two samples of one file, read twice an epoch (as `--data d,d`
    would be); paths are compared resolved: relative, through a symlink, or absolute."""
    video = tmp_path / "src" / "c0" / "v.mkv"
    video.parent.mkdir(parents=True)
    _offset_video(video, "mpeg4", frames=2, first_pts=0)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "alias").symlink_to(tmp_path / "src")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# train\n../src/c0/v.mkv\n\nalias/c0/v.mkv\n{video}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["shards", "build", "--list", str(listing), str(out),
                                      "--frames", "2", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == (f"Error: {listing}: lines 2, 4 and 5 all name {video.resolve()}; "
                             "list each input once (each line is a sample)\n")
    assert not out.exists()
    # A Kinetics CSV row repeated (here with its times written as floats): one clip.
    clip = tmp_path / "kinetics" / "juggling" / "abc_000000_000010.mkv"
    clip.parent.mkdir(parents=True)
    _offset_video(clip, "mpeg4", frames=2, first_pts=0)
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("label,youtube_id,time_start,time_end,split\n"
                        "juggling,abc,0,10,train\n"
                        "juggling,xyz,0,10,train\n"
                        "juggling,abc,0.0,10.0,train\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{csv_file}: lines 2 and 4 both name "
                                                         f"{clip.resolve()}; ")):
        discover_list(csv_file, video_root=tmp_path / "kinetics")


@pytest.fixture(scope="module")
def image_build(tmp_path_factory):
    """A small EXIF-orientation-6 JPEG (kept), a large one (resized), a 16-bit grey PNG;
    each decoded by DALI's CPU image decoder from the shards."""
    src = tmp_path_factory.mktemp("images") / "src"
    (src / "c").mkdir(parents=True)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    _gradient(60, 40).save(src / "c" / "small_exif6.jpg", quality=95, exif=exif)
    _gradient(600, 400).save(src / "c" / "large_exif6.jpg", quality=95, exif=exif)
    grey = np.linspace(0, 65535, 64 * 40).reshape(40, 64).round().astype(np.uint16)
    Image.fromarray(grey).save(src / "c" / "grey16.png")
    out = src.parent / "out"
    manifest = build_shards(src, out, kind="image", short_side=100, progress=False)
    assert manifest["failures"] == 0
    tars, indices = zip(*((str(t), str(i)) for t, i in shard_paths(out)))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        image, meta = fn.readers.webdataset(paths=list(tars), index_paths=list(indices), ext=["jpg", "json"],
                                            dtypes=[types.UINT8, types.UINT8], random_shuffle=False)
        return fn.decoders.image(image, device="cpu", output_type=types.RGB), meta

    pipe = pipeline()
    pipe.build()
    stored = {json.loads(c["json"])["source"]: c["jpg"] for t in tars for c in read_tar(Path(t)).values()}
    decoded = {}
    for _ in range(manifest["total_samples"]):
        image, meta = pipe.run()
        meta = json.loads(np.array(meta[0]).tobytes())
        decoded[meta["source"]] = (np.array(image[0]), meta, stored[meta["source"]])
    assert len(decoded) == 3
    return src, decoded


def test_exif_orientation_is_not_applied_dali_sees_what_pil_reads(image_build):
    src, decoded = image_build
    for name, size in (("small_exif6.jpg", (60, 40)), ("large_exif6.jpg", (150, 100))):
        pixels, meta, data = decoded[f"c/{name}"]
        assert pixels.shape == (meta["height"], meta["width"], 3) == (size[1], size[0], 3), name
        with Image.open(src / "c" / name) as source:  # PIL: stored pixels, unrotated
            reference = source.convert("RGB")
        assert Image.open(io.BytesIO(data)).getexif().get(EXIF_ORIENTATION, 1) == 1
        if reference.size != size:
            reference = reference.resize(size, Image.BICUBIC, reducing_gap=3.0)
        assert np.abs(pixels.astype(np.float32) - np.asarray(reference, np.float32)).mean() < 3.0, name
    # The small file is kept without re-encoding: only its Exif block is gone.
    pixels, _, data = decoded["c/small_exif6.jpg"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                          np.asarray(Image.open(src / "c" / "small_exif6.jpg").convert("RGB")))
    assert len(data) < (src / "c" / "small_exif6.jpg").stat().st_size


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(image_build):
    src, decoded = image_build
    with Image.open(src / "c" / "grey16.png") as source:
        assert source.mode == "I;16"
        expected = np.round(np.asarray(source, np.float64) / 257)
    pixels, meta, _ = decoded["c/grey16.png"]
    assert pixels.shape == (40, 64, 3) and (meta["width"], meta["height"]) == (64, 40)
    assert np.abs(pixels.astype(np.float64) - expected[..., None]).mean() < 2.0
    assert pixels.min() < 10 and pixels.max() > 245
