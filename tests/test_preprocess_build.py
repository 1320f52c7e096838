"""Shard builder through real files and real codecs: good videos in several containers,
broken inputs, deterministic rebuilds, refusal of mixed options, node split + merge,
images, list files, inspect --verify."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tcore.cli import main as cli
from tcore.preprocess.discover import Source, sample_key
from tcore.preprocess.errors import ShardDirError, TcoreWarning
from tcore.preprocess.index import read_index
from tcore.preprocess.manifest import load_manifest, make_manifest
from tcore.preprocess import shards as shard_builder
from tcore.preprocess.shards import (BuildError, build_shards, discover_inputs,
                                     merge_node_manifests, run_build, shard_order)
from tcore.preprocess.verify import inspect_shards
from tcore.pipelines.manifest import load_shard_set
from tcore.preprocess.video import output_size, uniform_indices
from shard_files import read_tar

SHORT_SIDE = 96  # sources are 160x128 -> clips 120x96
GOOD_PER_CLASS = 2


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _zero_frames(path: Path) -> None:
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        container.start_encoding()


# source relative path -> words its failure reason must contain
BROKEN = {
    "drift/zero_bytes.mp4": "empty file",
    "drift/notes.mp4": "not a readable video container",
    # FFmpeg's InvalidDataError gets the hint of what such a file usually is
    "orbit/cut.mp4": "not a readable video container (FFmpeg: Invalid data found when processing "
                     "input; a file cut off before its index, or not a video)",
    "orbit/cut.webm": "truncated",
    "pulse/speech.m4a": "no video stream",
    "swing/nothing.avi": "no frames",
}


@pytest.fixture(scope="module")
def mixed_src(synth_root, tmp_path_factory) -> Path:
    """Two good videos per class (mp4/mpeg4, webm/vp9, avi/mjpeg among them) plus one broken
    file of each kind."""
    src = tmp_path_factory.mktemp("mixed") / "src"
    for class_dir in sorted((synth_root / "train").iterdir()):
        for video in sorted(class_dir.iterdir())[:GOOD_PER_CLASS]:
            (src / class_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(video, src / class_dir.name / video.name)
    (src / "drift" / "zero_bytes.mp4").write_bytes(b"")
    (src / "drift" / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    mp4 = next((synth_root / "train").rglob("*.mp4")).read_bytes()
    (src / "orbit" / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    webm = next((synth_root / "train").rglob("*.webm")).read_bytes()
    (src / "orbit" / "cut.webm").write_bytes(webm[: len(webm) // 2])
    _audio_only(src / "pulse" / "speech.m4a")
    _zero_frames(src / "swing" / "nothing.avi")
    return src


@pytest.fixture(scope="module")
def mixed_build(mixed_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed_out") / "shards"
    build_shards(mixed_src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=4, progress=False)
    return out


def _all_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_broken_inputs_go_to_failures_and_the_build_carries_on(mixed_build, mixed_src):
    manifest = load_manifest(mixed_build, check_files=True)
    failures = [json.loads(line) for line in (mixed_build / "failures.jsonl").read_text().splitlines()]
    assert {f["source"] for f in failures} == set(BROKEN)
    for failure in failures:
        assert BROKEN[failure["source"]] in failure["error"], failure
        assert str(mixed_src) not in failure["error"], failure   # the source names the file
    assert manifest["failures"] == len(BROKEN)
    assert manifest["total_samples"] == 4 * GOOD_PER_CLASS
    assert manifest["classes"] == ["drift", "orbit", "pulse", "swing"]
    # 14 inputs in shards of 4: shard k holds whichever of the inputs at places 4k..4k+3 of
    # the shuffled order succeeded, keyed by their sorted index.
    inputs = discover_inputs(mixed_src)
    order = shard_order(inputs, 0)
    assert sorted(order) == list(range(14)) and order != sorted(order)
    assert [s["tar"] for s in manifest["shards"]] == [f"shard-{k:06d}.tar" for k in range(4)]
    for k, shard in enumerate(manifest["shards"]):
        expected = [i for i in order[4 * k:4 * k + 4] if inputs.sources[i].relative not in BROKEN]
        held = [int(key.split("-")[0]) for key in read_tar(mixed_build / shard["tar"])]
        assert held == expected and shard["samples"] == len(expected)
    assert sum(s["samples"] for s in manifest["shards"]) == 8
    assert [f["source"] for f in failures] == sorted(BROKEN)     # listed by source
    # bytes: each shard's tar on disk, and their sum
    assert [s["bytes"] for s in manifest["shards"]] == \
           [(mixed_build / s["tar"]).stat().st_size for s in manifest["shards"]]
    assert manifest["total_bytes"] == sum((mixed_build / s["tar"]).stat().st_size for s in manifest["shards"])


def test_samples_hold_clip_json_and_label(mixed_build, mixed_src):
    manifest = load_manifest(mixed_build)
    for shard in manifest["shards"]:
        samples = read_tar(mixed_build / shard["tar"])
        assert len(samples) == shard["samples"]
        for key, components in samples.items():
            assert set(components) == {"webm", "json", "cls"}
            assert "." not in key and "/" not in key
            meta = json.loads(components["json"])
            assert meta["label"] == manifest["classes"].index(meta["class"])
            assert components["cls"] == str(meta["label"]).encode()
            assert (mixed_src / meta["source"]).is_file()
            assert meta["source"].split("/")[0] == meta["class"]
            assert (meta["frames"], meta["width"], meta["height"], meta["codec"]) == (20, 120, 96, "vp9")
            assert meta["source_frames"] == 30 and meta["fps"] == 24.0
            assert meta["duration"] == pytest.approx(30 / 24, abs=0.05)
            assert meta["frame_indices"] == [int(i) for i in np.round(np.linspace(0, 29, 20))]
            with av.open(io.BytesIO(components["webm"])) as clip:
                frames = list(clip.decode(video=0))
                assert clip.streams.video[0].codec_context.name == "vp9"
            assert len(frames) == 20 and (frames[0].width, frames[0].height) == (120, 96)
            assert _keyframes(components["webm"]) == [0]  # default GOP 20 = T: one keyframe


def test_index_files_equal_what_dali_wds2idx_writes(mixed_build, tmp_path):
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for shard in load_manifest(mixed_build)["shards"]:
        reference = tmp_path / shard["index"]
        subprocess.run([str(wds2idx), str(mixed_build / shard["tar"]), str(reference)],
                       check=True, capture_output=True)
        assert (mixed_build / shard["index"]).read_text() == reference.read_text()
        assert len(read_index(reference)) == shard["samples"]


def test_rebuild_with_two_workers_is_byte_identical(mixed_src, mixed_build, tmp_path):
    again = tmp_path / "again"
    build_shards(mixed_src, again, frames=20, short_side=SHORT_SIDE, samples_per_shard=4, workers=2,
                 progress=False)
    assert _all_files(again) == _all_files(mixed_build)


def test_retry_failed_rebuilds_only_the_shards_holding_failures(mixed_src, mixed_build, tmp_path):
    """A Kinetics build keeps its failed downloads in finished shards; once they are
    downloaded again under the same paths, a plain rerun keeps them failed (every shard is
    done) and `--retry-failed` rebuilds just the shards holding a failed input whose file
    changed: not those whose failures are as they were (the copy keeps modification times)."""
    src, out = _fixed_copy(mixed_src, mixed_build, tmp_path)   # drift/notes.mp4 fixed
    before = _all_files(out)
    rerun = CliRunner().invoke(cli, ["shards", "build", str(src), str(out), "--short-side",
                                     str(SHORT_SIDE), "--samples-per-shard", "4", "--no-progress"])
    assert rerun.exit_code == 0, rerun.output
    assert "0 shards built, 4 already done" in rerun.output and "--retry-failed" in rerun.output
    assert _all_files(out) == before
    retry = CliRunner().invoke(cli, ["shards", "build", str(src), str(out), "--short-side",
                                     str(SHORT_SIDE), "--samples-per-shard", "4", "--no-progress",
                                     "--retry-failed"])
    assert retry.exit_code == 0, retry.output
    manifest = load_manifest(out, check_files=True)
    assert manifest["failures"] == len(BROKEN) - 1 and manifest["total_samples"] == 4 * GOOD_PER_CLASS + 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["source"] for f in failures) == sorted(set(BROKEN) - {"drift/notes.mp4"})
    inputs = discover_inputs(src)
    fixed = next(i for i, source in enumerate(inputs.sources) if source.relative == "drift/notes.mp4")
    keys = {name: list(read_tar(out / name)) for name in (s["tar"] for s in manifest["shards"])}
    holding = [name for name, held in keys.items() if sample_key(fixed, inputs.sources[fixed]) in held]
    assert len(holding) == 1
    # the one shard holding the fixed file was built again; the others, those with failures
    # that are as they were among them, are the same files
    order = shard_order(inputs, 0)
    with_failures = {f"shard-{k:06d}" for k in range(4)
                     if any(inputs.sources[i].relative in BROKEN for i in order[4 * k:4 * k + 4])}
    assert len(with_failures) > 1 and holding[0].removesuffix(".tar") in with_failures
    after = _all_files(out)
    for name in before:
        if name.startswith("shard-") and not name.startswith(holding[0].removesuffix(".tar")):
            assert after[name] == before[name], name
    assert "1 shards built, 3 already done" in retry.output
    again = CliRunner().invoke(cli, ["shards", "build", str(src), str(out), "--short-side",
                                     str(SHORT_SIDE), "--samples-per-shard", "4", "--no-progress",
                                     "--retry-failed"])        # nothing changed since: nothing
    assert again.exit_code == 0 and "0 shards built, 4 already done" in again.output
    assert (f"{len(BROKEN) - 1} failed inputs not retried: their files are as they were when "
            "they failed") in again.output


def test_a_retry_takes_again_a_failure_no_file_change_explains(mixed_src, tmp_path, monkeypatch):
    """An unexpected error (a library's bug, a passing I/O error) is not the file's doing:
    a retry takes it again though the file is as it was."""
    real = shard_builder.make_sample
    good = next(f"drift/{video.name}" for video in sorted((mixed_src / "drift").iterdir())
                if f"drift/{video.name}" not in BROKEN)

    def flaky(source, label, config):
        if source.relative == good:
            raise RuntimeError("a decoder's bug, once")
        return real(source, label, config)

    out = tmp_path / "out"
    options = dict(frames=20, short_side=SHORT_SIDE, samples_per_shard=4, progress=False)
    monkeypatch.setattr(shard_builder, "make_sample", flaky)
    first = run_build(mixed_src, out, **options)
    assert len(first.failures) == len(BROKEN) + 1
    assert any(f["error"] == "RuntimeError: a decoder's bug, once" for f in first.failures)
    monkeypatch.undo()
    retried = run_build(mixed_src, out, retry_failed=True, **options)
    assert retried.built_shards == 1 and len(retried.failures) == len(BROKEN)


def _fixed_copy(mixed_src, built, tmp_path) -> tuple[Path, Path]:
    """A copy of the sources with drift/notes.mp4 fixed, and a copy of a build of them."""
    src, out = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(mixed_src, src)
    shutil.copytree(built, out)
    good = next(video for video in sorted((src / "drift").iterdir())
                if video.suffix == ".mp4" and video.name != "notes.mp4")
    shutil.copy(good, src / "drift" / "notes.mp4")
    return src, out


def test_a_stopped_retry_leaves_no_manifest_or_record_describing_other_tars(
        mixed_src, mixed_build, tmp_path, monkeypatch):
    """A retry stopped after one rebuilt shard (Ctrl-C, a worker killed): the manifest that
    described the old shards is gone (a loader says there is none, rather than reading
    wrong counts), every record left describes the tar on disk, and a plain rerun finishes."""
    src, out = _fixed_copy(mixed_src, mixed_build, tmp_path)
    for broken in BROKEN:        # downloaded again, still broken: every such shard is retried
        os.utime(src / broken, ns=(1_000_000_000, 1_000_000_000))
    real, built = shard_builder.build_one_shard, []

    def stops_after_one(*args, **kwargs):
        if built:
            raise BuildError("stopped here by the test")
        built.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_builder, "build_one_shard", stops_after_one)
    options = dict(frames=20, short_side=SHORT_SIDE, samples_per_shard=4, progress=False)
    with pytest.raises(BuildError, match="stopped here"):
        run_build(src, out, retry_failed=True, **options)
    assert built and not (out / "manifest.json").exists()
    records = [json.loads(path.read_text()) for path in (out / ".build").glob("shard-*.json")]
    assert records and len(records) < 4                 # the others are to be built again
    for record in records:
        assert (out / record["tar"]).stat().st_size == record["bytes"], record
    with pytest.raises(ShardDirError, match=r"no shard manifest at .*was the build interrupted"):
        load_shard_set([str(out)])
    monkeypatch.undo()
    run_build(src, out, **options)                       # the same command, without --retry
    manifest = load_manifest(out, check_files=True)
    assert manifest["total_samples"] == 4 * GOOD_PER_CLASS + 1
    assert manifest["failures"] == len(BROKEN) - 1


def test_merge_refuses_a_node_manifest_whose_shards_were_built_again(mixed_src, tmp_path):
    """A split build merged, then retried as a whole build: the node manifests describe the
    tars as they were; merging them again would undo the whole build's manifest."""
    built = tmp_path / "built"
    for rank in range(2):
        build_shards(mixed_src, built, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                     node_rank=rank, num_nodes=2, progress=False)
    merge_node_manifests(built)
    tampered = tmp_path / "tampered"                  # a count off, the bytes the same
    shutil.copytree(built, tampered)
    node_0 = tampered / "manifest.node-00000-of-00002.json"
    manifest = json.loads(node_0.read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["total_samples"] += 1
    node_0.write_text(json.dumps(manifest))
    count = manifest["shards"][0]["samples"] - 1
    with pytest.raises(ShardDirError, match=rf"with {count} samples in its index, where "
                                            rf"{node_0.name} says \d+ bytes and {count + 1} samples"):
        merge_node_manifests(tampered)
    src, out = _fixed_copy(mixed_src, built, tmp_path)
    run_build(src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=4, progress=False,
              retry_failed=True)
    whole = (out / "manifest.json").read_bytes()
    with pytest.raises(ShardDirError, match=r"shard-0000\d\d\.tar is \d+ bytes with \d+ samples "
                                            r"in its index, where manifest\.node-0000\d-of-00002"
                                            r"\.json says \d+ bytes and \d+ samples: it was "
                                            r"built again"):
        merge_node_manifests(out)
    assert (out / "manifest.json").read_bytes() == whole


def test_out_built_with_other_options_is_refused(mixed_src, mixed_build, tmp_path):
    before = _all_files(mixed_build)
    with pytest.raises(ShardDirError, match="short_side: 96 -> 64"):
        build_shards(mixed_src, mixed_build, frames=20, short_side=64, samples_per_shard=4, progress=False)
    result = CliRunner().invoke(cli, ["shards", "build", str(mixed_src), str(mixed_build), "--short-side", "96",
                                      "--samples-per-shard", "4", "--codec", "mjpeg", "--no-progress"])
    assert result.exit_code != 0 and "other options" in result.output and "codec" in result.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ShardDirError, match="not empty"):
        build_shards(mixed_src, foreign, progress=False)
    assert _all_files(mixed_build) == before
    # Dot entries hold no one's shards: a sibling node's probe file (there for an instant as
    # it starts) or a .DS_Store made a fresh OUT "not empty".
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    (dotted / ".tcore-probe.abc").write_text("")
    (dotted / ".DS_Store").write_text("")
    assert build_shards(mixed_src, dotted, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                        progress=False)["total_samples"] == 4 * GOOD_PER_CLASS
    # The same options resume (nothing to do) and leave every file as it was.
    result = run_build(mixed_src, mixed_build, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                       progress=False)
    assert result.skipped_shards == 4 and result.built_shards == 0
    assert _all_files(mixed_build) == before


def test_a_build_made_before_shuffling_resumes_in_sorted_order_and_is_named(mixed_src, mixed_build,
                                                                          tmp_path):
    """Shard builds before `shuffle_seed` existed held their inputs in sorted order and
    recorded no such option: a rerun with --no-shuffle resumes them, the new default is
    refused naming the option, and the loader warns that batches will hold few classes."""
    assert inspect_shards(mixed_build)["order"] == "shuffled (seed 0)"
    out = tmp_path / "old"
    build_shards(mixed_src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                 shuffle_seed=None, progress=False)
    held = [int(key.split("-")[0]) for shard in sorted(out.glob("*.tar"))
            for key in read_tar(shard)]
    assert held == sorted(held)                                     # sorted order kept
    for path in (out / ".build" / "options.json", out / "manifest.json"):   # as made before
        recorded = json.loads(path.read_text())
        (recorded.get("options", recorded)).pop("shuffle_seed")
        path.write_text(json.dumps(recorded))
    (out / ".build" / "shard-000003.json").unlink()                 # an unfinished shard
    before = (out / "shard-000003.tar").read_bytes()
    result = CliRunner().invoke(cli, ["shards", "build", str(mixed_src), str(out), "--short-side",
                                      str(SHORT_SIDE), "--samples-per-shard", "4", "--no-progress"])
    assert result.exit_code != 0 and "shuffle_seed: None -> 0" in result.output
    assert "(--no-shuffle for shards in sorted order)" in result.output
    result = CliRunner().invoke(cli, ["shards", "build", str(mixed_src), str(out), "--no-shuffle",
                                      "--shuffle-seed", "3"])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(cli, ["shards", "build", str(mixed_src), str(out), "--short-side",
                                      str(SHORT_SIDE), "--samples-per-shard", "4", "--no-shuffle",
                                      "--no-progress"])
    assert result.exit_code == 0 and "1 shards built, 3 already done" in result.output
    assert (out / "shard-000003.tar").read_bytes() == before
    with pytest.warns(TcoreWarning, match=f"{out}: the shards hold their inputs in sorted order"):
        load_shard_set(out)
    result = CliRunner().invoke(cli, ["shards", "inspect", str(out)])
    assert "order: sorted, so in class order: batches hold few classes" in result.output
    # a command that reads them says so in one line (a real process: pytest keeps warnings)
    preview = subprocess.run([sys.executable, "-m", "tcore.cli", "pipeline", "preview", "--data",
                              str(out), "--output", str(tmp_path / "preview.png"),
                              "--batch-size", "2", "--local-crops", "0"],
                             capture_output=True, text=True, timeout=300)
    assert preview.returncode == 0, preview.stderr
    said = [line for line in preview.stderr.splitlines() if "class order" in line]
    assert said == [f"warning: {out}: the shards hold their inputs in sorted order, so in class "
                    "order for SRC/<class>/ folders (built with --no-shuffle, or by a tcore "
                    "before shard builds shuffled them), and each batch then holds only a few "
                    "classes; rebuild them with `tcore shards build` (shuffled by default)"
                    ], preview.stderr


def test_node_parts_of_one_build_merge_when_one_was_made_before_shuffling(mixed_src, tmp_path):
    """A split build in sorted order where node 0 finished under a tcore that recorded no
    `shuffle_seed` and node 1 ran now with --no-shuffle: still parts of one build."""
    out = tmp_path / "nodes"
    for rank in range(2):
        build_shards(mixed_src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                     shuffle_seed=None, node_rank=rank, num_nodes=2, progress=False)
    part0 = out / "manifest.node-00000-of-00002.json"
    recorded = json.loads(part0.read_text())
    recorded["options"].pop("shuffle_seed")
    part0.write_text(json.dumps(recorded))
    merged = merge_node_manifests(out)
    assert merged["options"]["shuffle_seed"] is None and merged["total_samples"] == 8
    recorded["options"]["shuffle_seed"] = 0                  # a part of another build
    part0.write_text(json.dumps(recorded))
    with pytest.raises(ShardDirError, match="options differs"):
        merge_node_manifests(out)


def test_node_split_and_merge_equal_a_single_build(mixed_src, mixed_build, tmp_path):
    out = tmp_path / "nodes"
    part = build_shards(mixed_src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=4,
                        node_rank=0, num_nodes=2, progress=False)
    assert [s["tar"] for s in part["shards"]] == ["shard-000000.tar", "shard-000002.tar"]
    node_1 = ["shards", "build", str(mixed_src), str(out), "--short-side", str(SHORT_SIDE),
              "--samples-per-shard", "4", "--node-rank", "1", "--num-nodes", "2", "--no-progress"]
    first = CliRunner().invoke(cli, node_1)
    assert first.exit_code == 0, first.output
    part = json.loads((out / "manifest.node-00001-of-00002.json").read_text())
    assert [s["tar"] for s in part["shards"]] == ["shard-000001.tar", "shard-000003.tar"]
    assert f"when every node has finished: tcore shards merge-manifest {out}" in first.output
    assert not (out / "manifest.json").exists()
    rerun = CliRunner().invoke(cli, node_1)          # nothing built: nothing to merge again
    assert rerun.exit_code == 0 and "merge-manifest" not in rerun.output, rerun.output
    # names this node's failures, not failures.jsonl
    assert f"(see {out / 'failures.node-00001-of-00002.jsonl'};" in rerun.output
    # Before the merge, reading the directory says how to finish it.
    before = CliRunner().invoke(cli, ["shards", "inspect", str(out)])
    assert before.exit_code != 0
    assert f"join them with `tcore shards merge-manifest {out}`" in before.output
    # tcore train says the same before it makes anything.
    train = CliRunner().invoke(cli, ["train", "--data", str(out), "--output", str(tmp_path / "r")])
    assert train.exit_code == 1 and "tcore shards merge-manifest" in train.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(cli, ["shards", "merge-manifest", str(out)])
    assert result.exit_code == 0, result.output
    single = load_manifest(mixed_build)
    merged = load_manifest(out, check_files=True)
    assert (merged["total_samples"], merged["total_bytes"], merged["failures"]) == \
           (single["total_samples"], single["total_bytes"], single["failures"])
    assert merged == single
    assert (out / "failures.jsonl").read_bytes() == (mixed_build / "failures.jsonl").read_bytes()
    for shard in single["shards"]:
        assert (out / shard["tar"]).read_bytes() == (mixed_build / shard["tar"]).read_bytes()


def test_merge_refuses_missing_node(mixed_src, tmp_path):
    out = tmp_path / "half"
    build_shards(mixed_src, out, frames=20, short_side=SHORT_SIDE, samples_per_shard=8, node_rank=1,
                 num_nodes=2, progress=False)
    # The count as a number (it read "of ['2'] nodes").
    with pytest.raises(ShardDirError, match=r"cover ranks \[1\] of 2 nodes; every node must "
                                            r"finish before merging"):
        merge_node_manifests(out)
    # An earlier attempt's manifest over 3 nodes left beside it: which files are whose, not
    # "every node must finish" (it read "cover ranks [0, 1] of node counts that disagree").
    earlier = json.loads((out / "manifest.node-00001-of-00002.json").read_text())
    earlier["node"] = {"rank": 0, "count": 3}
    (out / "manifest.node-00000-of-00003.json").write_text(json.dumps(earlier))
    with pytest.raises(ShardDirError, match=r"split over different numbers of nodes \(2 nodes: "
                                            r"manifest.node-00001-of-00002.json; 3 nodes: "
                                            r"manifest.node-00000-of-00003.json\); remove the "
                                            r"other build's files"):
        merge_node_manifests(out)


def test_image_kind(tmp_path):
    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir(parents=True)
    small = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    small.save(src / "cats" / "small.jpg", quality=85)
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(src / "cats" / "big.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(src / "dogs" / "pic.png")
    (src / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "dogs" / "readme.txt").write_text("recorded: not an image extension")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["shards", "build", str(src), str(out), "--kind", "image",
                                      "--short-side", "100", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "5 inputs in" in result.output and " images/s with 1 worker(s)" in result.output
    manifest = load_manifest(out)
    assert (manifest["kind"], manifest["codec"], manifest["clip_ext"], manifest["frames"]) == ("image", "jpeg", "jpg", None)
    assert manifest["total_samples"] == 3 and manifest["failures"] == 2
    broken, readme = map(json.loads, (out / "failures.jsonl").read_text().splitlines())
    assert broken["source"] == "dogs/broken.jpg" and "not a decodable image" in broken["error"]
    # Not silently dropped, as a video build would not drop it either.
    assert readme == {"source": "dogs/readme.txt", "error": "not an image file (extension .txt; "
                      "--kind image reads .bmp, .gif, .jpeg, .jpg, .png, .ppm, .tif, .tiff, .webp)"}
    samples = {json.loads(c["json"])["source"]: c for c in read_tar(out / "shard-000000.tar").values()}
    assert samples["cats/small.jpg"]["jpg"] == (src / "cats" / "small.jpg").read_bytes()  # kept as is
    for source, size in {"cats/small.jpg": (80, 60), "cats/big.jpg": (100, 150), "dogs/pic.png": (70, 50)}.items():
        meta = json.loads(samples[source]["json"])
        image = Image.open(io.BytesIO(samples[source]["jpg"]))
        assert image.format == "JPEG" and image.size == size == (meta["width"], meta["height"])
        assert samples[source]["cls"] == (b"0" if source.startswith("cats") else b"1")
    assert inspect_shards(out, verify=True)["problems"] == []


def test_inspect_says_the_short_side_option_is_a_bound_unless_upscaling(synth_root, tmp_path):
    """Sources are 160x128 and never enlarged by default: --short-side 320 stores 128."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    shutil.copy(next((synth_root / "train").rglob("*.webm")), src / "v.webm")
    cases = {("--short-side", "320"): "short side <= 320 (sources are not enlarged)",
             ("--short-side", "160", "--allow-upscale"): "short side 160 (sources resized up or down to it)",
             ("--short-side", "0"): "short side as the sources (not resized)"}
    stored = {"320": "128", "160": "160", "0": "128"}
    for options, text in cases.items():
        out = tmp_path / f"out{options[1]}"
        built = CliRunner().invoke(cli, ["shards", "build", str(src.parent), str(out), "--frames", "4",
                                         *options, "--no-progress"])
        assert built.exit_code == 0, built.output
        plain = CliRunner().invoke(cli, ["shards", "inspect", str(out)])
        assert plain.exit_code == 0 and f"{text}\n" in plain.output, plain.output
        verified = CliRunner().invoke(cli, ["shards", "inspect", str(out), "--verify"])
        assert f"{text}, stored {stored[options[1]]}\n" in verified.output, verified.output
        assert inspect_shards(out)["short_side_option"] == int(options[1])


def test_kinetics_csv_and_plain_list(synth_root, tmp_path):
    root = tmp_path / "kinetics"
    videos = sorted((synth_root / "train").rglob("*.webm"))[:2]
    (root / "riding a bike").mkdir(parents=True)
    shutil.copy(videos[0], root / "riding a bike" / "abc-_12_000010_000020.webm")
    shutil.copy(videos[1], root / "xyz_000000_000010.mkv")  # flat layout, other extension
    # a label folder with underscores for spaces; of two files of one clip the first by
    # name; a folder named like a clip is not one; an id with a dot in it
    (root / "playing_guitar" / "q_000001_000011.d").mkdir(parents=True)
    shutil.copy(videos[0], root / "playing_guitar" / "q_000001_000011.webm")
    shutil.copy(videos[1], root / "playing_guitar" / "d.t_000002_000012.webm")
    (root / "playing_guitar" / "q_000001_000011.webm.part").write_bytes(b"partial download")
    # what yt-dlp leaves beside a clip, sorting before it by name, is not the clip
    (root / "riding a bike" / "abc-_12_000010_000020.description").write_text("a video")
    (root / "riding a bike" / "abc-_12_000010_000020.info.json").write_text("{}")
    (root / "riding a bike" / "abc-_12_000010_000020.en.srv3").write_text("<timedtext/>")
    (root / "riding a bike" / "abc-_12_000010_000020.f137.mp4.part-Frag3").write_bytes(b"x")
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("label,youtube_id,time_start,time_end,split\n"
                        "riding a bike,abc-_12,10,20,train\n"
                        "juggling,xyz,0,10,train\n"
                        "juggling,missing1,5,15,train\n"
                        "playing guitar,q,1,11,train\n"
                        "playing guitar,d.t,2,12,train\n")
    out = tmp_path / "out"
    manifest = build_shards(None, out, list_file=csv_file, video_root=root, short_side=64, progress=False)
    assert manifest["classes"] == ["juggling", "playing guitar", "riding a bike"]
    assert manifest["total_samples"] == 4 and manifest["failures"] == 1
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure == {"source": "juggling/missing1_000005_000015", "error": "file not found"}
    metas = sorted((json.loads(c["json"]) for c in read_tar(out / "shard-000000.tar").values()),
                   key=lambda m: (m["label"], m["source"]))
    assert [(m["class"], m["label"], m["source"]) for m in metas] == [
        ("juggling", 0, "xyz_000000_000010.mkv"),
        ("playing guitar", 1, "playing_guitar/d.t_000002_000012.webm"),
        ("playing guitar", 1, "playing_guitar/q_000001_000011.webm"),
        ("riding a bike", 2, "riding a bike/abc-_12_000010_000020.webm")]

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p.relative_to(synth_root / 'train').as_posix()}\n" for p in videos))
    out2 = tmp_path / "out2"
    manifest = build_shards(None, out2, list_file=listing, video_root=synth_root / "train", short_side=64,
                            progress=False)
    assert manifest["total_samples"] == 2 and manifest["classes"] == sorted({p.parent.name for p in videos})


def test_a_kinetics_row_downloaded_later_is_retried_in_its_place(synth_root, tmp_path):
    """A Kinetics row is named by label/id_start_end, not by the file found for it: a clip
    missing at the first build, or broken and downloaded again in another container, keeps
    the row's place, so `--retry-failed` takes it (the input set was refused as changed)."""
    videos = sorted(path for path in (synth_root / "train").rglob("*.webm"))[:3] * 2
    root = tmp_path / "root"
    (root / "juggling").mkdir(parents=True)
    rows = [f"juggling,clip{n},{n},{n + 10},train\n" for n in range(6)]
    for n in range(6):
        if n == 2:
            continue                                           # not downloaded yet
        shutil.copy(videos[n], root / "juggling" / f"clip{n}_{n:06d}_{n + 10:06d}.webm")
    broken = root / "juggling" / "clip4_000004_000014.webm"
    broken.write_bytes(broken.read_bytes()[:3000])             # a cut download
    csv_file = tmp_path / "k.csv"
    csv_file.write_text("label,youtube_id,time_start,time_end,split\n" + "".join(rows))
    out = tmp_path / "out"
    options = dict(list_file=csv_file, video_root=root, frames=8, short_side=64,
                   samples_per_shard=2, progress=False)
    first = run_build(None, out, **options)
    assert sorted(f["source"] for f in first.failures) == [
        "juggling/clip2_000002_000012", "juggling/clip4_000004_000014.webm"]
    before = _all_files(out)
    shutil.copy(videos[2], root / "juggling" / "clip2_000002_000012.mp4")   # downloaded
    os.utime(broken, ns=(1_000_000_000, 1_000_000_000))                    # the old, broken one
    shutil.copy(videos[4], root / "juggling" / "clip4_000004_000014.mkv")   # again, as mkv
    retried = run_build(None, out, retry_failed=True, **options)
    assert retried.failures == [] and retried.manifest["total_samples"] == 6
    inputs = discover_inputs(None, list_file=csv_file, video_root=root)
    order = shard_order(inputs, 0)
    keys = [inputs.sources[i].key for i in order]
    held = {k: [s.key for s in inputs.sources if s.key in keys[2 * k:2 * k + 2]] for k in range(3)}
    fixed = {"juggling/clip2_000002_000012", "juggling/clip4_000004_000014"}
    for k in range(3):        # the shards without those two rows are the files they were
        name = f"shard-{k:06d}.tar"
        if not fixed & set(held[k]):
            assert _all_files(out)[name] == before[name], name
    assert load_manifest(out, check_files=True)["failures"] == 0
    # A Kinetics build begun before rows had their own names (no `input_keys` recorded) is
    # refused as such, not as "files were added, removed or renamed"
    options_file = out / ".build" / "options.json"
    saved = json.loads(options_file.read_text())
    del saved["input_keys"]
    options_file.write_text(json.dumps(saved))
    with pytest.raises(ShardDirError, match="begun by an earlier tcore, which named each "
                                            "Kinetics row by the file found for it"):
        run_build(None, out, **options)


def test_inspect_verify_finds_a_corrupted_sample(synth_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    clean = CliRunner().invoke(cli, ["shards", "inspect", str(copy), "--verify"])
    assert clean.exit_code == 0 and "verify: 0 problem(s)" in clean.output and "codec vp9" in clean.output
    # Overwrite the middle of one clip's bytes in place (the tar structure stays valid).
    samples = read_index(copy / "shard-000001.idx")
    ext, offset, size, name = samples[2][0]
    assert ext == "webm"
    with open(copy / "shard-000001.tar", "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(size // 2))
    report = inspect_shards(copy, verify=True)
    assert [(p["tar"], p["key"]) for p in report["problems"]] == [("shard-000001.tar", name.split(".")[0])]
    result = CliRunner().invoke(cli, ["shards", "inspect", str(copy), "--verify"])
    assert result.exit_code == 1 and "BAD shard-000001.tar:" in result.output


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(ShardDirError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "video"}))
    with pytest.raises(ShardDirError, match="missing field 'codec'"):
        load_manifest(tmp_path)
    shards = [{"tar": "shard-000000.tar", "index": "shard-000000.idx", "samples": 3, "bytes": 10240}]
    manifest = make_manifest(kind="video", frames=20, codec="vp9", short_side=128, classes=["a"],
                             shards=shards, failures=0, options={})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(tmp_path)["total_samples"] == 3
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "total_samples": 4}))
    with pytest.raises(ShardDirError, match="total_samples does not equal the sum over shards"):
        load_manifest(tmp_path)


def test_keys_frames_and_sizes():
    key = sample_key(7, Source("/x", "../a.b/c d..e/../f.mp4", "a.b"))
    assert key.startswith("00000007-") and "." not in key and "/" not in key and ".." not in key
    assert uniform_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]  # fewer frames than T: repeats
    assert uniform_indices(100, 3) == [0, 50, 99]
    assert output_size(640, 360, 320) == (568, 320)
    assert output_size(300, 200, 320) == (300, 200)  # never upscaled unless asked
    assert output_size(300, 201, 320, allow_upscale=True) == (476, 320)
    assert output_size(301, 201, 0) == (300, 200)  # 0 keeps the size (rounded down to even)
    # 138 * (88 / 138) is 87.99999999999999 in floating point: the short side is still 88
    assert output_size(201, 138, 88) == (128, 88)
    assert output_size(138, 201, 88) == (88, 128)


def _keyframes(data: bytes) -> list[int]:
    with av.open(io.BytesIO(data)) as container:
        return [i for i, packet in enumerate(p for p in container.demux(video=0) if p.size) if packet.is_keyframe]


@pytest.mark.parametrize("codec, ext, decoder", [("h264", "mp4", "h264"), ("mjpeg", "mkv", "mjpeg")])
def test_other_codecs_gop_and_upscale(synth_root, tmp_path, codec, ext, decoder):
    src = tmp_path / "src"
    (src / "drift").mkdir(parents=True)
    for video in sorted((synth_root / "train" / "drift").iterdir())[:2]:
        shutil.copy(video, src / "drift" / video.name)
    plain = build_shards(src, tmp_path / "plain", codec=codec, short_side=256, gop=5, progress=False)
    upscaled = build_shards(src, tmp_path / "up", codec=codec, short_side=256, gop=5, allow_upscale=True,
                            progress=False)
    for manifest, out, size in ((plain, tmp_path / "plain", (160, 128)), (upscaled, tmp_path / "up", (320, 256))):
        assert (manifest["codec"], manifest["clip_ext"], manifest["total_samples"]) == (codec, ext, 2)
        for components in read_tar(out / "shard-000000.tar").values():
            meta = json.loads(components["json"])
            assert (meta["width"], meta["height"]) == size
            with av.open(io.BytesIO(components[ext])) as clip:
                assert clip.streams.video[0].codec_context.name == decoder
                frames = list(clip.decode(video=0))
            assert len(frames) == 20 and (frames[0].width, frames[0].height) == size
            expected_keys = list(range(20)) if codec == "mjpeg" else [0, 5, 10, 15]
            assert _keyframes(components[ext]) == expected_keys


def _rgb_frames(data_or_path) -> list[np.ndarray]:
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source) as container:
        return [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]


@pytest.mark.parametrize("ext", ["mp4", "webm", "avi"])
@pytest.mark.parametrize("codec", ["vp9", "h264", "mjpeg"])
def test_clips_keep_the_source_pixels(synth_root, ext, codec):
    """Colour range and matrix survive (MJPEG sources are full range), and a decoded frame's
    picture type does not force keyframes."""
    from tcore.preprocess.video import encode_clip, read_clip

    path = next((synth_root / "train").rglob(f"*.{ext}"))
    clip = read_clip(str(path), 20, 0)
    data = encode_clip(clip.frames, codec, gop=10)
    source, decoded = _rgb_frames(path), _rgb_frames(data)
    assert len(decoded) == 20
    for frame, index in zip(decoded, clip.frame_indices):
        assert np.abs(frame - source[index]).mean() < 5.0  # lossy, but the same picture
        assert abs(frame.mean() - source[index].mean()) < 1.0  # no brightness shift
    assert _keyframes(data) == (list(range(20)) if codec == "mjpeg" else [0, 10])


@pytest.mark.parametrize("ext", ["mp4", "webm", "avi"])
def test_jpeg_frame_shards_hold_t_jpegs_of_the_source(synth_root, tmp_path, ext):
    """`--codec jpegs`: one component of T standalone JPEGs whose sizes the json lists, the
    same pictures as the source frames, passing `inspect --verify` (a wrong size list is
    reported: tests/test_pipeline_loader.py)."""
    src = tmp_path / "src" / "drift"
    src.mkdir(parents=True)
    path = next((synth_root / "train").rglob(f"*.{ext}"))
    shutil.copy(path, src / path.name)
    result = CliRunner().invoke(cli, ["shards", "build", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "--codec", "jpegs", "--short-side", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "out")
    assert (manifest["kind"], manifest["codec"], manifest["clip_ext"]) == ("video", "jpegs", "jpgs")
    (components,) = read_tar(tmp_path / "out" / "shard-000000.tar").values()
    meta = json.loads(components["json"])
    sizes, data = meta["frame_bytes"], components["jpgs"]
    assert len(sizes) == 20 and sum(sizes) == len(data)
    source = _rgb_frames(path)
    offset = 0
    for size, index in zip(sizes, meta["frame_indices"]):
        image = data[offset:offset + size]
        offset += size
        assert image[:2] == b"\xff\xd8" and image[-2:] == b"\xff\xd9"   # one whole JPEG each
        frame = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)
        assert frame.shape == (meta["height"], meta["width"], 3)
        assert np.abs(frame - source[index]).mean() < 5.0
        # Limited -> full range, then libjpeg's own YCbCr -> RGB: within 1.5 levels (mp4
        # source 1.25, the others below 1).
        assert abs(frame.mean() - source[index].mean()) < 1.5
    assert inspect_shards(tmp_path / "out", verify=True)["problems"] == []


def test_without_pyav_the_cli_imports_and_video_commands_say_why(synth_root, tmp_path):
    """The GPU machines have no PyAV: `tcore` must still import (train, bench), and building
    video shards or synthetic videos must fail at once saying what is missing. A child
    process where `import av` fails for real (sys.modules['av'] = None)."""
    code = ("import sys; sys.modules['av'] = None\n"
            "from tcore.cli import main\n"
            "main(sys.argv[1:])\n")
    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=120)
    assert run("bench", "--help").returncode == 0
    build = run("shards", "build", str(synth_root / "train"), str(tmp_path / "out"), "--no-progress")
    assert build.returncode != 0 and "needs PyAV" in build.stderr, build.stderr[-2000:]
    assert not (tmp_path / "out").exists()          # failed before writing anything
    synth = run("data", "synth", str(tmp_path / "synth"))
    assert synth.returncode != 0 and "needs PyAV" in synth.stderr, synth.stderr[-2000:]
