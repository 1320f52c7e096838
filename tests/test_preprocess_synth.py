"""The built-in synthetic dataset: layout, codecs, determinism per seed, and DAVIS masks that
match the rendered pixels exactly."""

import av
import pytest
import numpy as np
from click.testing import CliRunner
from PIL import Image

from tcore.cli import main as cli
from tcore.preprocess.synth import davis_palette, make_synthetic, render_video

TINY = dict(videos=4, frames=8, size=(64, 48), davis_videos=2, davis_frames=5, davis_size=(64, 48))


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_layout_codecs_and_determinism(tmp_path):
    first = make_synthetic(tmp_path / "a", seed=3, **TINY)
    assert first["classes"] == ["drift", "orbit", "pulse", "swing"]
    codecs = {}
    for relative in first["videos"]:
        with av.open(str(tmp_path / "a" / relative)) as container:
            frames = list(container.decode(video=0))
            codecs[relative.rsplit(".", 1)[1]] = container.streams.video[0].codec_context.name
        assert len(frames) == 8 and (frames[0].width, frames[0].height) == (64, 48)
        assert relative.startswith(f"train/{relative.split('/')[1]}/")
    assert codecs == {"mp4": "mpeg4", "webm": "vp9", "avi": "mjpeg"}

    result = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "b"), "--seed", "3", "--videos", "4",
                                      "--frames", "8", "--size", "64x48", "--davis-videos", "2",
                                      "--davis-frames", "5", "--davis-size", "64x48"])
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # byte-identical per seed
    other = make_synthetic(tmp_path / "c", seed=4, **TINY)
    assert other["videos"] == first["videos"]
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


def test_davis_part_layout_and_palette(synth_root):
    davis = synth_root / "davis"
    names = (davis / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == ["synth00", "synth01", "synth02"]
    palette = davis_palette()
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0] and len(palette) == 768
    for name in names:
        frames = sorted((davis / "JPEGImages" / "480p" / name).glob("*.jpg"))
        masks = sorted((davis / "Annotations" / "480p" / name).glob("*.png"))
        assert [p.stem for p in frames] == [p.stem for p in masks] == [f"{t:05d}" for t in range(16)]
        for frame_path, mask_path in zip(frames, masks):
            mask = Image.open(mask_path)
            assert mask.mode == "P" and mask.getpalette()[:9] == palette[:9]
            assert mask.size == Image.open(frame_path).size == (160, 96)
            assert set(np.unique(np.array(mask))) <= {0, 1, 2}
        first = np.array(Image.open(masks[0]))
        assert {1, 2} <= set(np.unique(first))  # both objects visible in the first frame


def test_masks_are_exactly_the_object_pixels(synth_root):
    """Rendering with and without objects from the same seed gives the same background, so
    the frame equals the background exactly where the mask is 0 and differs where an object is."""
    for index in range(3):
        frames, ids = render_video(np.random.default_rng([0, 1, index]), ["drift", "orbit", "pulse"][index],
                                   16, 160, 96, 2)
        background, empty_ids = render_video(np.random.default_rng([0, 1, index]), ["drift", "orbit", "pulse"][index],
                                             16, 160, 96, 0)
        assert not empty_ids.any()
        outside = ids == 0
        assert np.array_equal(frames[outside], background[outside])
        changed = np.any(frames != background, axis=-1)
        assert changed[~outside].mean() > 0.95  # object textures differ from what they cover
        # The written PNG masks are these ids, and the JPEGs are these frames (lossy, quality 95).
        name = f"synth{index:02d}"
        for t in (0, 7, 15):
            png = np.array(Image.open(synth_root / "davis" / "Annotations" / "480p" / name / f"{t:05d}.png"))
            assert np.array_equal(png, ids[t])
            jpg = np.array(Image.open(synth_root / "davis" / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"))
            assert np.abs(jpg.astype(int) - frames[t]).mean() < 6


def test_objects_occlude_and_move(synth_root):
    frames, ids = render_video(np.random.default_rng([0, 0, 1]), "orbit", 48, 160, 128, 3)
    areas = np.array([[(ids[t] == k).sum() for k in (1, 2, 3)] for t in range(48)])
    assert (areas > 0).all()
    # Occlusion: some object's visible area shrinks below its full size at some point.
    assert (areas.min(axis=0) < areas.max(axis=0)).any()
    centroids = [np.argwhere(ids[t] == 3).mean(axis=0) for t in (0, 10)]
    assert np.linalg.norm(centroids[1] - centroids[0]) > 3  # the top object moved


def test_same_options_reuse_and_other_options_are_refused(tmp_path):
    out = tmp_path / "s"
    assert make_synthetic(out, seed=1, **TINY)["reused"] is False
    before = _files(out)
    again = make_synthetic(out, seed=1, **TINY)      # reused: nothing rewritten, and it says so
    assert _files(out) == before and (out / again["videos"][0]).is_file() and again["reused"]
    # A file deleted or emptied since is not "reused as is": the set is made again, the
    # same bytes as before (it said "reused" over the holes).
    (out / again["videos"][1]).unlink()
    (out / "davis" / "Annotations" / "480p" / "synth01" / "00003.png").write_bytes(b"")
    remade = make_synthetic(out, seed=1, **TINY)
    assert remade["reused"] is False and _files(out) == before
    with pytest.raises(ValueError, match="other options"):
        make_synthetic(out, seed=2, **TINY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("unrelated")
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic(tmp_path / "other", seed=1, **TINY)
