"""VIP and JHMDB readers, propagation and metrics on small fixtures in their official
layouts (a colour stand-in backbone makes the expected answers exact)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tcore.eval import jhmdb, metrics, vip
from tcore.eval.io import read_label_png, write_label_png
from tcore.eval.features import labels_to_grid, upsample_labels
from tcore.eval.segment import label_set, onehot


def colour_encoder(patch=16):
    def encode(images):
        return torch.nn.functional.avg_pool2d(images, patch).flatten(2).transpose(1, 2)
    return encode


# ----------------------------------------------------------------------------- VIP
def write_vip(root: Path, name: str, images: np.ndarray, labels: dict[int, np.ndarray]) -> None:
    for t, image in enumerate(images):
        path = root / "Images" / name / f"{t:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=98)
        if t in labels:
            write_label_png(root / "Annotations" / "Category_ids" / name / f"{t:012d}.png",
                            labels[t])


def part_video(frames=4, size=(48, 64)):
    """Patch-aligned part blocks (classes 0, 3, 7) that move by one patch every frame."""
    images = np.full((frames, *size, 3), 128, dtype=np.uint8)
    labels = np.zeros((frames, *size), dtype=np.uint8)
    for t in range(frames):
        x = 16 * (t % 2)
        images[t, 0:32, x:x + 16] = (255, 0, 0)
        labels[t, 0:32, x:x + 16] = 3
        images[t, 32:48, 32:64] = (0, 0, 255)
        labels[t, 32:48, 32:64] = 7
    return images, labels


def test_vip_perfect_parts_and_confusion_over_all_frames(tmp_path):
    images, labels = part_video()
    # frame 2 has no annotation: propagated but not scored, and reported
    write_vip(tmp_path / "vip", "videos1", images, {0: labels[0], 1: labels[1], 3: labels[3]})
    result = vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "out", size=(48, 64), topk=3,
                              encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    per_class = {row["class"]: row["IoU"] for row in result["per_class"]}
    # every patch gets its true class; bilinear upsampling only rounds the blocks' corners
    for cls in (0, 3, 7):
        assert per_class[cls] == pytest.approx(1.0, abs=0.1)
    assert np.isnan(per_class[5])
    assert result["summary"]["classes_present"] == 3
    assert result["per_sequence"][0]["scored_frames"] == 2
    assert any("1 frames have no annotation" in w for w in result["warnings"])
    pred = read_label_png(tmp_path / "out" / "predictions" / "videos1" / "000000000002.png")
    np.testing.assert_array_equal(pred[8::16, 8::16], labels[2, 8::16, 8::16])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"]["mIoU"] == pytest.approx(result["summary"]["mIoU"])
    assert (tmp_path / "out" / "results.csv").read_text().count("\nclass,") == 20


def test_vip_miou_pools_one_confusion_over_all_videos(tmp_path):
    """The CRW evaluation accumulates one confusion matrix over every scored frame of every
    video and takes its mIoU, which is not the mean of the per-video mIoUs: here a second
    video whose later annotations call the blue block class 5 (propagation says 7)."""
    images, labels = part_video(frames=3)
    write_vip(tmp_path / "vip", "a_right", images, {t: labels[t] for t in range(3)})
    relabelled = labels.copy()
    relabelled[1:][relabelled[1:] == 7] = 5
    write_vip(tmp_path / "vip", "b_relabelled", images, {t: relabelled[t] for t in range(3)})
    result = vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "out", size=(48, 64), topk=3,
                              encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    pooled = np.zeros((vip.VIP_CLASSES, vip.VIP_CLASSES), dtype=np.int64)
    for name, truth in (("a_right", labels), ("b_relabelled", relabelled)):
        for t in (1, 2):
            pred = read_label_png(tmp_path / "out" / "predictions" / name / f"{t:012d}.png")
            pooled += metrics.confusion_matrix(truth[t], pred, vip.VIP_CLASSES)
    assert result["summary"]["mIoU"] == pytest.approx(metrics.mean_iou(pooled))
    per_video = np.mean([row["mIoU"] for row in result["per_sequence"]])
    assert abs(result["summary"]["mIoU"] - per_video) > 0.05  # the two differ here


def test_vip_layout_errors(tmp_path):
    images, labels = part_video()
    write_vip(tmp_path / "vip", "videos1", images, {1: labels[1]})
    with pytest.raises(FileNotFoundError, match="first frame"):
        vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "out", encoder=colour_encoder(),
                         patch=16, progress=False, device="cpu")
    with pytest.raises(FileNotFoundError, match="annotation folder"):
        vip.video_names(tmp_path / "nothing")


def test_vip_short_side_size():
    from tcore.eval.features import short_side_size
    assert short_side_size((720, 1280), 880, 16) == (880, 1568)


def test_vip_long_side_size_is_the_released_loaders():
    """The released code's VIP loader (CropMAE's): long side 880, the other side floored to a
    multiple of 64: 448 x 880 for 16:9 frames, the 28 x 55 = 1540-token grid its own test
    script expects; portrait frames the other way round."""
    from tcore.eval.features import long_side_size
    for frame in ((720, 1280), (1080, 1920), (480, 854), (540, 960)):
        assert long_side_size(frame, 880) == (448, 880), frame
    assert long_side_size((600, 800), 880) == (640, 880)
    assert long_side_size((1280, 720), 880) == (880, 448)


def test_vip_evaluates_a_training_mode_backbone_frozen_and_gives_it_back(tmp_path):
    """A backbone handed over in training mode with heavy drop path runs in eval mode while
    it encodes the frames (its blocks' mode seen at each call), the same scores twice, and is
    given back in training mode."""
    from tcore.models import build_backbone
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", drop_path=0.5).train()
    modes = []
    backbone.blocks[0].register_forward_pre_hook(lambda block, args: modes.append(block.training))
    images, labels = part_video(frames=3)
    write_vip(tmp_path / "vip", "v", images, {t: labels[t] for t in range(3)})
    runs = [vip.evaluate_vip(backbone, tmp_path / "vip", tmp_path / f"out{i}", size=(48, 64),
                             topk=3, progress=False, device="cpu") for i in range(2)]
    assert modes and not any(modes)
    assert backbone.training
    assert runs[0]["summary"] == runs[1]["summary"]


def test_vip_released_sizing_and_first_frame_scoring(tmp_path):
    """`long_side` sizes each video by the released loader's rule, and `score_first_frame`
    scores frame 0 as its labels read out at the feature grid (a block edge off the patch
    grid is then rounded to it, so frame 0 is not scored perfect); results.json records
    both."""
    images, labels = part_video(frames=3, size=(96, 128))
    labels[0, 0:40, 0:16] = 3                  # an edge at row 40, inside a patch row
    write_vip(tmp_path / "vip", "v", images, {t: labels[t] for t in range(3)})
    common = dict(topk=3, encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    default = vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "a", **common)
    released = vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "b", long_side=128,
                                score_first_frame=True, **common)
    assert default["input_sizes"]["v"] == [880, 1168]       # short side 880
    assert released["input_sizes"]["v"] == [64, 128]        # 96 * 128 / 128 floored to 64
    assert default["per_sequence"][0]["scored_frames"] == 2
    assert released["per_sequence"][0]["scored_frames"] == 3
    first = read_label_png(tmp_path / "b" / "predictions" / "v" / "000000000000.png")
    # read out through the 4 x 8 grid: mostly right, the edge at row 40 moved
    assert not np.array_equal(first, labels[0]) and (first == labels[0]).mean() > 0.8
    # ... at the 64 x 128 input size, then enlarged to 96 x 128 as PIL's NEAREST does (the
    # released VIP scorer), not as OpenCV's (DAVIS's), which puts the edge elsewhere here
    ids = label_set(labels[0])
    grid = labels_to_grid(onehot(labels[0], ids), (4, 8))
    at_input = upsample_labels(grid, (64, 128)).argmax(-1).numpy().astype(np.uint8)
    pil = ids[np.asarray(Image.fromarray(at_input).resize((128, 96), Image.NEAREST))]
    opencv = ids[at_input[np.floor(np.arange(96) * 64 / 96).astype(int)]]
    assert np.array_equal(first, pil) and not np.array_equal(first, opencv)
    kept = read_label_png(tmp_path / "a" / "predictions" / "v" / "000000000000.png")
    assert np.array_equal(kept, labels[0])                  # METHOD.md: frame 0 is given
    assert released["settings"]["long_side"] == 128 and released["settings"]["short_side"] is None
    assert released["settings"]["first_frame_scored"] is True
    with pytest.raises(ValueError, match="not both"):
        vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "c", size=(64, 128), long_side=128,
                         **common)
    # A long side off the patch grid is refused before any video (it failed at the first
    # one, naming --size, and left an empty output).
    with pytest.raises(ValueError, match=r"--long-side 100: .*a multiple of it \(16\)"):
        vip.evaluate_vip(None, tmp_path / "vip", tmp_path / "d", long_side=100, **common)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- JHMDB
JOINTS = np.array([[24 + 64 * (j % 5), 24 + 80 * (j // 5)] for j in range(15)], dtype=float)


def write_jhmdb(root: Path, action: str, video: str, frames: np.ndarray, pos: np.ndarray,
                test: bool = True) -> None:
    for t, image in enumerate(frames):
        path = root / "Rename_Images" / action / video / f"{t + 1:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    mat = root / "joint_positions" / action / video / "joint_positions.mat"
    mat.parent.mkdir(parents=True, exist_ok=True)
    # official field layout: pos_img [2, 15, T] (1-based pixels), pos_world, scale, viewpoint
    scipy.io.savemat(str(mat), {"pos_img": pos + 1.0, "pos_world": pos / 100.0,
                                "scale": np.ones((1, pos.shape[2])),
                                "viewpoint": np.array(["E"] * pos.shape[2], dtype=object)})
    split = root / "splits" / f"{action}_test_split1.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    with open(split, "a") as handle:
        handle.write(f"{video}.avi {2 if test else 1}\n")


def patchwork_frames(frames=4, size=(240, 320), seed=0):
    """A static video of random patch colours (16x16 cells), so every location is unique."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(size[0] // 16 + 1, size[1] // 16 + 1, 3), dtype=np.uint8)
    image = np.kron(cells, np.ones((16, 16, 1), dtype=np.uint8))[:size[0], :size[1]]
    return np.repeat(image[None], frames, axis=0)


def test_jhmdb_static_video_gives_full_pck(tmp_path):
    frames = patchwork_frames()
    pos = np.repeat(JOINTS.T[:, :, None], len(frames), axis=2)  # [2, 15, T]
    write_jhmdb(tmp_path / "jhmdb", "walk", "clip_a", frames, pos)
    write_jhmdb(tmp_path / "jhmdb", "walk", "clip_train", frames, pos, test=False)
    result = jhmdb.evaluate_jhmdb(None, tmp_path / "jhmdb", tmp_path / "out", size=(320, 320),
                                  encoder=colour_encoder(), patch=16, progress=False,
                                  device="cpu", visualize=True)
    assert [row["sequence"] for row in result["per_sequence"]] == ["walk/clip_a"]
    assert result["summary"]["PCK@0.1"] == pytest.approx(1.0)
    assert result["summary"]["PCK@0.2"] == pytest.approx(1.0)
    saved = scipy.io.loadmat(str(tmp_path / "out" / "predictions" / "joint_positions" / "walk"
                                 / "clip_a" / "joint_positions.mat"))["pos_img"]
    assert saved.shape == (2, 15, len(frames))
    # predictions land within a feature cell (16 px wide, 12 px high here) of the truth
    assert np.abs(saved - 1 - pos)[:, :, 1:].max() < 16
    assert (tmp_path / "out" / "visualize" / "walk__clip_a.png").is_file()


def test_joint_label_maps_and_readout():
    points = np.array([[2.3, 7.6], [4.0, 2.4]])  # two joints (x, y) in cells
    labels = jhmdb.joint_labels(points, (6, 10))
    assert labels.shape == (6, 10, 3)
    assert labels[4, 2, 1] == pytest.approx(1.0)     # peak at (round(y), round(x))
    assert labels[2, 8, 2] == pytest.approx(1.0)
    assert labels[4, 3, 1] == pytest.approx(np.exp(-2.0))  # sigma 0.5 neighbour
    assert labels[..., 0][labels[..., 1:].sum(-1) == 0].min() == 1.0
    coords = jhmdb.read_out_keypoints(torch.from_numpy(labels)[None])
    assert coords.shape == (2, 2, 1)
    np.testing.assert_allclose(coords[:, 0, 0], [2.0, 4.0], atol=0.15)
    empty = torch.zeros(1, 6, 10, 3)
    assert (jhmdb.read_out_keypoints(empty) == -1).all()
    # the value-weighted mean of the 5 highest cells, as T-CoRe's evaluation reads a joint
    # out: 1.0 at (x 3, y 2), 0.5 at (4, 2) and (3, 3), 0.25 at (2, 2) and (3, 1), then 0.1
    # everywhere else (3 cells would give (3.25, 2.25); 6 would take in a 0.1 cell)
    soft = torch.full((1, 6, 10, 2), 0.1)
    soft[0, 2, 3, 1], soft[0, 2, 4, 1], soft[0, 3, 3, 1] = 1.0, 0.5, 0.5
    soft[0, 2, 2, 1], soft[0, 1, 3, 1] = 0.25, 0.25
    x = (3 * 1.0 + 4 * 0.5 + 3 * 0.5 + 2 * 0.25 + 3 * 0.25) / 2.5
    y = (2 * 1.0 + 2 * 0.5 + 3 * 0.5 + 2 * 0.25 + 1 * 0.25) / 2.5
    np.testing.assert_allclose(jhmdb.read_out_keypoints(soft)[:, 0, 0], [x, y], atol=1e-6)


def test_joint_files_are_one_based_like_matlab(tmp_path):
    """pos_img holds 1-based MATLAB pixel coordinates: read as 0-based, written back 1-based
    (a joint that was not found is written as 0)."""
    pos = np.random.default_rng(0).uniform(1, 300, size=(2, 15, 4))
    scipy.io.savemat(str(tmp_path / "truth.mat"), {"pos_img": pos})
    np.testing.assert_allclose(jhmdb.read_joints(tmp_path / "truth.mat"), pos - 1.0)
    pred = pos - 1.0
    pred[:, 3, 2] = -1
    jhmdb._write_joints(tmp_path / "pred.mat", pred)
    saved = scipy.io.loadmat(str(tmp_path / "pred.mat"))["pos_img"]
    expected = pos.copy()
    expected[:, 3, 2] = 0.0
    np.testing.assert_allclose(saved, expected)


def test_jhmdb_readers_and_mismatches(tmp_path):
    frames = patchwork_frames(frames=3)
    pos = np.repeat(JOINTS.T[:, :, None], 5, axis=2)  # more poses than frames
    write_jhmdb(tmp_path / "j", "run", "v", frames, pos)
    with pytest.raises(ValueError, match="5 annotated poses but only 3 frames"):
        jhmdb.evaluate_jhmdb(None, tmp_path / "j", tmp_path / "o", encoder=colour_encoder(),
                             patch=16, progress=False, device="cpu")
    # fewer poses than frames: the frames with a pose are evaluated, and that is reported
    write_jhmdb(tmp_path / "k", "run", "w", patchwork_frames(frames=4),
                np.repeat(JOINTS.T[:, :, None], 3, axis=2))
    result = jhmdb.evaluate_jhmdb(None, tmp_path / "k", tmp_path / "o2", encoder=colour_encoder(),
                                  patch=16, progress=False, device="cpu")
    assert result["per_sequence"][0]["frames"] == 3
    assert any("4 frames but 3 poses" in w for w in result["warnings"])
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(str(bad), {"pos_img": np.zeros((2, 14, 3))})
    with pytest.raises(ValueError, match="expected \\[2, 15, T\\]"):
        jhmdb.read_joints(bad)
    with pytest.raises(FileNotFoundError, match="split"):
        jhmdb.test_videos(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- commands
from reference_paths import OFFICIAL_TINY as REFERENCE


def test_vip_and_jhmdb_commands_with_the_reference_fixture(tmp_path):
    from click.testing import CliRunner

    from tcore.cli import main
    images, labels = part_video(frames=3)
    write_vip(tmp_path / "vip", "videos7", images, {t: labels[t] for t in range(3)})
    run = CliRunner().invoke(main, ["eval", "vip", "--data", str(tmp_path / "vip"),
                                    "--checkpoint", str(REFERENCE), "--size", "48x64",
                                    "--output", str(tmp_path / "vip_out"), "--device", "cpu"])
    assert run.exit_code == 0, run.output
    saved = json.loads((tmp_path / "vip_out" / "results.json").read_text())
    assert saved["summary"]["mIoU"] == pytest.approx(0.958, abs=0.02)   # measured 0.9583
    assert saved["checkpoint"] == str(REFERENCE.resolve()) and saved["settings"]["topk"] == 10
    # METHOD.md section 7 defaults: VIP short side 880, top-10, radius 20, temperature 0.7,
    # first frame + previous 20. A fixed --size replaces the short side, which is recorded
    # as not used; each video's input size is recorded.
    assert {k: saved["settings"][k] for k in ("short_side", "size", "radius", "temperature",
                                              "context", "long_memory")} == \
           {"short_side": None, "size": [48, 64], "radius": 20, "temperature": 0.7,
            "context": 20, "long_memory": [0]}
    assert saved["input_sizes"] == {"videos7": [48, 64]}
    assert "[default: 880; x>=1]" in CliRunner().invoke(main, ["eval", "vip", "--help"]).output

    frames = patchwork_frames(frames=3)
    write_jhmdb(tmp_path / "jhmdb", "jump", "clip", frames,
                np.repeat(JOINTS.T[:, :, None], 3, axis=2))
    run = CliRunner().invoke(main, ["eval", "jhmdb", "--data", str(tmp_path / "jhmdb"),
                                    "--checkpoint", str(REFERENCE), "--arch", "vit_tiny",
                                    "--output", str(tmp_path / "j_out"), "--device", "cpu",
                                    "--visualize"])
    assert run.exit_code == 0, run.output
    assert "PCK@0.1" in run.output
    saved = json.loads((tmp_path / "j_out" / "results.json").read_text())
    assert saved["settings"]["size"] == [320, 320]
    assert {k: saved["settings"][k] for k in ("topk", "radius", "temperature", "context")} == \
           {"topk": 7, "radius": 20, "temperature": 0.7, "context": 20}
    # a static video whose every patch is unique: each joint stays where it was
    assert saved["summary"] == {"PCK@0.1": 1.0, "PCK@0.2": 1.0}
    # 'native' (each video's own size) is DAVIS's: VIP refuses it rather than ignoring it.
    native = CliRunner().invoke(main, ["eval", "vip", "--data", str(tmp_path / "vip"),
                                       "--checkpoint", str(REFERENCE), "--size", "native",
                                       "--output", str(tmp_path / "vip_native")])
    assert native.exit_code == 2 and "'native' is DAVIS only" in native.output
    assert not (tmp_path / "vip_native").exists()
    wrong_arch = CliRunner().invoke(main, ["eval", "jhmdb", "--data", str(tmp_path / "jhmdb"),
                                           "--checkpoint", str(REFERENCE), "--arch", "vit_small",
                                           "--output", str(tmp_path / "x")])
    assert wrong_arch.exit_code != 0, wrong_arch.output
    assert "backbone of width 192 and 2 blocks does not match --arch vit_small (width 384, " \
           "12 blocks)" in wrong_arch.output


# ----------------------------------------------------------------------------- bad input
def run_vip(root, out, **kwargs):
    return vip.evaluate_vip(None, root, out, size=(48, 64), topk=3, encoder=colour_encoder(),
                            patch=16, progress=False, device="cpu", **kwargs)


def test_vip_checks_every_annotation(tmp_path):
    images, labels = part_video()
    ann = "Annotations/Category_ids/v1/000000000001.png"
    # a later annotation of the same pixel count but another shape was scored after flattening
    write_vip(tmp_path / "shape", "v1", images, {0: labels[0], 1: labels[1].reshape(64, 48)})
    with pytest.raises(ValueError, match=rf"{ann}: annotation is 64x48 but frame .* is 48x64"):
        run_vip(tmp_path / "shape", tmp_path / "o1")
    write_vip(tmp_path / "size", "v1", images, {0: labels[0], 1: labels[1][:, :40]})
    with pytest.raises(ValueError, match=rf"{ann}: annotation is 48x40 but frame .* is 48x64"):
        run_vip(tmp_path / "size", tmp_path / "o2")
    # class ids 20..254 in a later frame were dropped from the confusion without a word
    bad = labels[1].copy()
    bad[bad == 3] = 33
    bad[0, 0] = 254
    bad[-1, -1] = 255  # ignore: allowed
    write_vip(tmp_path / "ids", "v1", images, {0: labels[0], 1: bad})
    with pytest.raises(ValueError, match=rf"{ann}: class ids \[33, 254\] outside 0..19"):
        run_vip(tmp_path / "ids", tmp_path / "o3")
    first = labels[0].copy()
    first[0, 0] = 20
    write_vip(tmp_path / "first", "v1", images, {0: first})
    with pytest.raises(ValueError, match=r"000000000000.png: class ids \[20\]"):
        run_vip(tmp_path / "first", tmp_path / "o4")


def test_frames_of_another_size_name_the_file(tmp_path):
    images, labels = part_video()
    write_vip(tmp_path / "vip", "v1", images, {0: labels[0]})
    Image.fromarray(np.full((32, 64, 3), 128, np.uint8)).save(
        tmp_path / "vip" / "Images" / "v1" / "000000000002.jpg")
    with pytest.raises(ValueError, match=r"v1/000000000002.jpg: size 32x64 differs from "
                                         r".*v1/000000000000.jpg \(48x64\)"):
        run_vip(tmp_path / "vip", tmp_path / "o")
    frames = patchwork_frames(frames=3)
    write_jhmdb(tmp_path / "j", "run", "v", frames, np.repeat(JOINTS.T[:, :, None], 3, axis=2))
    Image.fromarray(frames[0, :200]).save(tmp_path / "j" / "Rename_Images" / "run" / "v"
                                          / "00003.png")
    with pytest.raises(ValueError, match=r"v/00003.png: size 200x320 differs from "
                                         r".*v/00001.png \(240x320\)"):
        jhmdb.evaluate_jhmdb(None, tmp_path / "j", tmp_path / "oj", encoder=colour_encoder(),
                             patch=16, progress=False, device="cpu")


def test_jhmdb_mat_without_poses_names_the_file(tmp_path):
    write_jhmdb(tmp_path / "j", "run", "v", patchwork_frames(frames=3), np.zeros((2, 15, 0)))
    with pytest.raises(ValueError, match=r"v/joint_positions.mat: holds no poses"):
        jhmdb.evaluate_jhmdb(None, tmp_path / "j", tmp_path / "o", encoder=colour_encoder(),
                             patch=16, progress=False, device="cpu")


def test_zero_or_negative_counts_are_refused_up_front(tmp_path):
    images, labels = part_video()
    write_vip(tmp_path / "vip", "v1", images, {0: labels[0], 1: labels[1]})
    for name, value in (("batch_size", 0), ("batch_size", -1), ("chunk_size", 0),
                        ("context", 0)):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got {value}"):
            run_vip(tmp_path / "vip", tmp_path / "o", **{name: value})


def test_a_listed_video_missing_on_disk_fails_before_any_propagation(tmp_path):
    # On real data a video takes minutes; a missing one found at its turn would waste the
    # videos before it. Each benchmark finds every video's files first, writing nothing.
    from davis_files import moving_squares, write_davis
    from tcore.eval import davis

    images, labels = part_video(frames=3)
    write_vip(tmp_path / "vip", "a_good", images, {0: labels[0], 2: labels[2]})
    lists = tmp_path / "vip" / "lists"
    lists.mkdir()
    (lists / "val_videos.txt").write_text("a_good\nz_missing\n")
    with pytest.raises(FileNotFoundError, match="z_missing: VIP video folder not found"):
        run_vip(tmp_path / "vip", tmp_path / "vip_out")
    assert not (tmp_path / "vip_out" / "predictions").exists()

    frames = patchwork_frames(frames=2)
    write_jhmdb(tmp_path / "jhmdb", "run", "a_good", frames, np.repeat(JOINTS.T[:, :, None], 2, axis=2))
    with open(tmp_path / "jhmdb" / "splits" / "run_test_split1.txt", "a") as split:
        split.write("z_missing.avi 2\n")
    with pytest.raises(FileNotFoundError, match="z_missing: no .png frames"):
        jhmdb.evaluate_jhmdb(None, tmp_path / "jhmdb", tmp_path / "j_out", encoder=colour_encoder(),
                             patch=16, progress=False, device="cpu")
    assert not (tmp_path / "j_out" / "predictions").exists()

    data = write_davis(tmp_path / "davis", {"a_good": moving_squares()})
    with open(data / "ImageSets" / "2017" / "val.txt", "a") as split:
        split.write("z_missing\n")
    with pytest.raises(FileNotFoundError, match="z_missing: sequence folder not found"):
        davis.evaluate_davis(None, data, tmp_path / "d_out", size=None, topk=3,
                             encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    assert not (tmp_path / "d_out" / "predictions").exists()


def test_a_video_listed_twice_is_refused_before_any_propagation(tmp_path):
    # Scored twice, it weighed double in the mean (J&F 0.2198 -> 0.2006 on a synthetic set),
    # where the official tools count each video once.
    from davis_files import moving_squares, write_davis
    from tcore.eval import davis

    images, labels = part_video(frames=3)
    write_vip(tmp_path / "vip", "a_good", images, {0: labels[0], 2: labels[2]})
    listing = tmp_path / "vip" / "lists" / "val_videos.txt"
    listing.parent.mkdir()
    listing.write_text("a_good\n\na_good\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(listing))}: lists a_good more than "
                                         r"once$"):
        run_vip(tmp_path / "vip", tmp_path / "vip_out")
    assert not (tmp_path / "vip_out").exists()

    data = write_davis(tmp_path / "davis", {"a_good": moving_squares()})
    split = data / "ImageSets" / "2017" / "val.txt"
    with open(split, "a") as lines:
        lines.write("a_good\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(split))}: lists a_good more than "
                                         r"once$"):
        davis.evaluate_davis(None, data, tmp_path / "d_out", size=None, topk=3,
                             encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    assert not (tmp_path / "d_out").exists()


def test_a_davis_sequence_too_short_to_score_is_refused_before_any_propagation(tmp_path):
    # Found at its turn before, after the sequences listed ahead of it had been propagated.
    from davis_files import moving_squares, write_davis
    from tcore.eval import davis

    data = write_davis(tmp_path / "davis", {"a_good": moving_squares(),
                                            "b_short": moving_squares(frames=2)})
    with pytest.raises(ValueError, match=r"^sequence b_short: needs at least 3 frames \(first "
                                         r"and last are not scored\), has 2$"):
        davis.evaluate_davis(None, data, tmp_path / "d_out", size=None, topk=3,
                             encoder=colour_encoder(), patch=16, progress=False, device="cpu")
    assert not (tmp_path / "d_out" / "predictions").exists()
