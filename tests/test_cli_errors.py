"""Bad shards and bad config values reach the user as one clear message, never a traceback:
`tcore train`, `tcore bench data` and `tcore pipeline preview` on corrupt copies of the real
test shards; training-config keys named in full; manifest / index disagreements found when
the shards are loaded."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tcore.cli import main
from tcore.config import ConfigError, load_config
from tcore.pipelines.config import PipelineConfig, PipelineConfigError
from tcore.pipelines.manifest import ShardSetError, load_shard_set
from tcore.preprocess.errors import ShardDirError
from tcore.preprocess.index import read_index

TRAIN_FAST = ["model.head.prototypes=256", "data.batch_size_per_gpu=4", "data.num_threads=1"]


def _copy(shards: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(shards, out)
    return out


def _edit_manifest(shards: Path, **changes) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _truncated(shards, tmp_path):
    out = _copy(shards, tmp_path)
    tar = out / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return [out], "shard-000001.tar: truncated or corrupt"


def _broken_manifest(shards, tmp_path):
    out = _copy(shards, tmp_path)
    (out / "manifest.json").write_text('{"kind": "video"\n')
    return [out], "manifest.json: not valid JSON"


def _no_manifest(shards, tmp_path):
    out = _copy(shards, tmp_path)
    (out / "manifest.json").unlink()
    return [out], r"no (shard manifest at|manifest\.json there)"   # bench / train words


def _h264(shards, tmp_path):
    # What an H.264 build's manifest says; the CPU start-up check reads nothing else.
    out = _copy(shards, tmp_path)
    _edit_manifest(out, codec="h264", clip_ext="mp4")
    return [out], "h264 shards cannot be decoded on the CPU.*--codec vp9"


def _mixed_layouts(shards, tmp_path):
    images = _copy(shards, tmp_path, "images")
    _edit_manifest(images, kind="image", codec="jpeg", clip_ext="jpg", frames=None)
    return [shards, images], r"cannot mix shard layouts \['image', 'video'\]"


def _corrupt_clips(shards, tmp_path):
    """Every clip's header overwritten: the first batch fails to decode, whatever the order."""
    out = _copy(shards, tmp_path)
    for tar in sorted(out.glob("*.tar")):
        data = bytearray(tar.read_bytes())
        for sample in read_index(tar.with_suffix(".idx")):
            for ext, offset, size, _name in sample:
                if ext == "webm":
                    data[offset:offset + 200] = bytes(range(200))
        tar.write_bytes(bytes(data))
    return [out], r"sample .*shard-00000\d\.tar.* cannot be decoded"


def _same_directory_twice(shards, tmp_path):
    # Read twice, every sample would come twice an epoch.
    return [shards, shards], "the same shard directory given more than once"


BAD_DATA = {"truncated": _truncated, "broken_manifest": _broken_manifest,
            "no_manifest": _no_manifest, "h264_on_cpu": _h264, "mixed_layouts": _mixed_layouts,
            "corrupt_clips": _corrupt_clips, "same_directory_twice": _same_directory_twice}


def _assert_clean_error(result, message: str) -> None:
    """A ClickException: exit status 1, the message, no traceback (CliRunner keeps an
    uncaught exception in `result.exception` rather than a SystemExit)."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_train_names_bad_shards_without_traceback(case, synth_shards, tmp_path):
    dirs, message = BAD_DATA[case](synth_shards, tmp_path)
    result = CliRunner().invoke(main, ["train", "--data", ",".join(map(str, dirs)), "--output",
                                       str(tmp_path / "run"), "--max-steps", "1",
                                       "--no-progress", *TRAIN_FAST])
    _assert_clean_error(result, message)
    # Shards that are bad as a set fail before the run directory is made; only a clip that
    # does not decode is found later, by the loader.
    assert (tmp_path / "run").exists() == (case == "corrupt_clips")


EVERY = "train.checkpoint_every must be an integer > 0"     # the config's own rule
STOP_AT = "need an integer > 0"


@pytest.mark.parametrize("option, value, message", [("--checkpoint-every", "0", EVERY),
                                                    ("--checkpoint-every", "-2", EVERY),
                                                    ("--max-steps", "0", STOP_AT),
                                                    ("--max-steps", "-1", STOP_AT)])
def test_train_step_counts_are_checked_before_the_run_directory_is_made(option, value, message,
                                                                       synth_shards, tmp_path):
    # 0 once divided by zero at the first step (or trained the whole schedule); -2 was
    # written into the run's config, which --resume then refused.
    result = CliRunner().invoke(main, ["train", "--data", str(synth_shards), "--output",
                                       str(tmp_path / "run"), option, value, "--no-progress",
                                       *TRAIN_FAST])
    _assert_clean_error(result, f"{option} {value}: {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_an_output_that_is_a_file_or_below_one_is_named(synth_shards, tmp_path, resume):
    # "[Errno 17] File exists: 'afile.txt'" before, and a NotADirectoryError traceback below it.
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    for output, said in ((afile, "is a file, not a directory"),
                         (afile / "run", f"{afile} is a file, not a directory")):
        result = CliRunner().invoke(main, ["train", "--data", str(synth_shards), "--output",
                                           str(output), "--max-steps", "1", "--no-progress",
                                           *TRAIN_FAST] + (["--resume"] if resume else []))
        _assert_clean_error(result, re.escape(f"--output {output}: {said}"))
    assert afile.read_text() == "mine"


def test_a_new_run_is_refused_among_other_files(synth_shards, tmp_path):
    """--output naming a folder of other files (here the --data folder itself) is refused
    before anything is written there; a folder holding only a run's files is not."""
    shards = _copy(synth_shards, tmp_path, "shards")
    before = sorted(path.name for path in shards.iterdir())
    result = CliRunner().invoke(main, ["train", "--data", str(shards), "--output", str(shards),
                                       "--max-steps", "1", "--no-progress", *TRAIN_FAST])
    _assert_clean_error(result, r"shards: holds files that are not a tcore run's \(\S+")
    assert sorted(path.name for path in shards.iterdir()) == before
    started = tmp_path / "started"          # a start that ended before its first checkpoint
    started.mkdir()
    (started / "config.yaml").write_text("{}\n")
    (started / "metrics.jsonl").write_text("")
    from tcore.train import check_new_run_directory
    check_new_run_directory(started)


@pytest.mark.parametrize("case", ["preview_stats_is_the_picture", "eval_radius_0",
                                  "image_shards_with_clip_options", "no_nodes",
                                  "jpegs_with_crf", "mjpeg_with_gop", "h264_with_vp9_speed",
                                  "vp9_with_quality"])
def test_options_that_could_not_mean_anything_are_refused(case, synth_shards, tmp_path):
    picture = str(tmp_path / "p.png")
    command, message = {
        "preview_stats_is_the_picture": (
            ["pipeline", "preview", "--data", str(synth_shards), "--output", picture,
             "--stats", picture], "also --output"),
        "eval_radius_0": (
            ["eval", "davis", "--data", str(synth_shards), "--checkpoint",
             str(synth_shards / "manifest.json"), "--output", str(tmp_path / "ev"),
             "--radius", "0"], "--radius"),
        "image_shards_with_clip_options": (
            ["shards", "build", str(tmp_path), str(tmp_path / "out"), "--kind", "image",
             "--frames", "5", "--crf", "40"], "--frames, --crf: options of video clips"),
        "no_nodes": (["shards", "build", str(tmp_path), str(tmp_path / "out"), "--num-nodes",
                      "0"], "--num-nodes"),
        # Encoder options the codec ignores: the build was byte for byte the one without
        # them, and the manifest kept them, so a rerun without them was refused.
        "jpegs_with_crf": (
            ["shards", "build", str(tmp_path), str(tmp_path / "out"), "--codec", "jpegs",
             "--crf", "10"], "--crf: not used by --codec jpegs, which takes --quality"),
        "mjpeg_with_gop": (
            ["shards", "build", str(tmp_path), str(tmp_path / "out"), "--codec", "mjpeg",
             "--gop", "5", "--quality", "80"],
            "--gop: not used by --codec mjpeg, which takes --quality"),
        "h264_with_vp9_speed": (
            ["shards", "build", str(tmp_path), str(tmp_path / "out"), "--codec", "h264",
             "--vp9-speed", "3"], "--vp9-speed: not used by --codec h264, which takes --gop, --crf"),
        "vp9_with_quality": (
            ["shards", "build", str(tmp_path), str(tmp_path / "out"), "--quality", "50"],
            "--quality: not used by --codec vp9, which takes --gop, --crf, --vp9-speed"),
    }[case]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.output, result.output
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "ev").exists()


def test_shards_built_inside_their_source_folder_are_refused(tmp_path):
    # Built there once, the output became a class folder of the next run, and the rerun,
    # which should resume, refused the changed inputs.
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "clip.webm").write_bytes(b"not read")
    result = CliRunner().invoke(main, ["shards", "build", str(tmp_path / "src"),
                                       str(tmp_path / "src" / "shards")])
    _assert_clean_error(result, r"output \S+shards is inside the source folder")
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["a"]


def test_repeated_data_options_are_all_read_as_commas_are(synth_shards, tmp_path):
    # `--data A --data B` once trained on B alone, silently: the mixed layouts show both read.
    dirs, message = _mixed_layouts(synth_shards, tmp_path)
    for command in (["train", "--output", str(tmp_path / "run"), "--max-steps", "1",
                     "--no-progress", *TRAIN_FAST],
                    ["pipeline", "preview", "--output", str(tmp_path / "p.png")]):
        repeated = [item for d in dirs for item in ("--data", str(d))]
        _assert_clean_error(CliRunner().invoke(main, command + repeated), message)
        with_commas = ["--data", ",".join(map(str, dirs))]
        _assert_clean_error(CliRunner().invoke(main, command + with_commas), message)
    missing = CliRunner().invoke(main, ["pipeline", "preview", "--output", str(tmp_path / "q.png"),
                                        "--data", f"{dirs[0]},{tmp_path / 'nowhere'}"])
    assert missing.exit_code == 2 and "nowhere: no such file or directory" in missing.output
    # A shard directory whose name holds a comma (shards build accepts one) is named whole,
    # with the reason, not as a missing first half.
    (tmp_path / "out,comma").mkdir()
    comma = CliRunner().invoke(main, ["pipeline", "preview", "--output", str(tmp_path / "r.png"),
                                      "--data", str(tmp_path / "out,comma")])
    assert comma.exit_code == 2 and "out,comma: a path with a comma" in comma.output, comma.output


@pytest.mark.parametrize("case", sorted(set(BAD_DATA) - {"mixed_layouts",
                                                          "same_directory_twice"}))  # one --data
def test_bench_data_names_bad_shards_without_traceback(case, synth_shards, tmp_path):
    dirs, message = BAD_DATA[case](synth_shards, tmp_path)
    result = CliRunner().invoke(main, ["bench", "data", "--data", str(dirs[0]), "--loader",
                                       "dali", "--threads", "1", "--batch", "2", "--seconds",
                                       "0.1", "--warmup", "0", "--repeats", "1",
                                       "--set", "views.n_local=0"])
    _assert_clean_error(result, message)


@pytest.mark.parametrize("case", ["broken_manifest", "no_manifest", "mixed_layouts"])
def test_preview_names_bad_shard_directories_without_traceback(case, synth_shards, tmp_path):
    dirs, message = BAD_DATA[case](synth_shards, tmp_path)
    args = ["pipeline", "preview", "--output", str(tmp_path / "p.png"), "--batch-size", "2",
            "--local-crops", "0"]
    for directory in dirs:
        args += ["--data", str(directory)]
    _assert_clean_error(CliRunner().invoke(main, args), message)


@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--batches", "0"),
                                           ("--batches", "-2"), ("--batch-size", "0"),
                                           ("--local-crops", "-1"),
                                           # tracebacks from numpy and DALI before
                                           ("--seed", "-1"), ("--seed", str(2**31)),
                                           # torch parses it; the preview ran and said 0
                                           ("--device", "meta")])
def test_preview_counts_are_checked_before_anything_runs(option, value, synth_shards, tmp_path):
    png = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["pipeline", "preview", "--data", str(synth_shards),
                                       "--output", str(png), "--stats", str(tmp_path / "s.json"),
                                       option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not png.exists()


def test_preview_takes_gpu_as_cuda(synth_shards, tmp_path):
    """`--device gpu` is `cuda`, as in `tcore bench` (it was "not a torch device")."""
    from tcore.commands import check_torch_device
    from tcore.pipelines.arguments import torch_device_name

    assert [torch_device_name(name) for name in ("gpu", "gpu:1", "cuda", "cpu")] == [
        "cuda", "cuda:1", "cuda", "cpu"]
    assert check_torch_device(None, None, "cpu") == "cpu"
    if torch.cuda.is_available():
        assert check_torch_device(None, None, "gpu") == "cuda"
        return
    png = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["pipeline", "preview", "--data", str(synth_shards),
                                       "--output", str(png), "--device", "gpu"])
    assert result.exit_code == 2, result.output
    assert "'gpu' needs a GPU, but CUDA is not available here" in result.output
    assert not png.exists()


@pytest.mark.parametrize("option", ["--output", "--stats"])
def test_preview_output_under_a_file_is_named_before_the_run(option, synth_shards, tmp_path):
    # "afile/pv.png: cannot write: afile: File exists" before, after the batches were made
    afile = tmp_path / "afile"
    afile.write_text("mine")
    paths = {"--output": str(tmp_path / "p.png"), "--stats": str(tmp_path / "s.json")}
    paths[option] = str(afile / "x")
    result = CliRunner().invoke(main, ["pipeline", "preview", "--data", str(synth_shards),
                                       "--output", paths["--output"], "--stats",
                                       paths["--stats"]])
    _assert_clean_error(result, re.escape(f"{option} {afile / 'x'}: {afile} is a file, not a "
                                          "directory"))
    assert afile.read_text() == "mine" and not (tmp_path / "p.png").exists()


# --- training config: data.pipeline.sampling, full key names, patch sizes -----------------

def test_pipeline_sampling_in_a_train_config_is_refused_not_overwritten(tmp_path):
    # The override is named (and the file it was applied over), not the file alone.
    with pytest.raises(ConfigError, match=r"^override 'data\.pipeline\.sampling\.current_range="
                                          r"\[0\.4,0\.6\]' \(over .*tiny_cpu\.yaml\): "
                                          r"data\.pipeline\.sampling .*is not "
                                          r"used.*data\.current_range, data\.past_offset_range "
                                          r"and data\.future_offset_range"):
        load_config("tiny_cpu", ["data.pipeline.sampling.current_range=[0.4,0.6]"])
    # The same ranges stated twice mislead nobody (a copied PipelineConfig dump says them).
    from tcore.train import pipeline_config
    cfg = load_config("tiny_cpu", ["data.current_range=[0.4,0.6]",
                                   "data.pipeline.sampling.current_range=[0.4,0.6]"])
    assert pipeline_config(cfg).sampling.current_range == (0.4, 0.6)
    # And through the command: refused before the run directory holds a config.yaml.
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--output",
                                       str(tmp_path / "run"),
                                       "data.pipeline.sampling.past_offset_range=[0.1,0.2]"])
    assert result.exit_code == 1 and "data.pipeline.sampling" in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_value_out_of_range_is_refused_before_the_run_directory_is_made(tmp_path):
    # A zero-width head used to die of a floating point exception at its first step, with no
    # message, leaving the run directory behind.
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--output", str(run),
                                       "model.head.prototypes=0"])
    assert result.exit_code == 1
    assert result.output.endswith("model.head.prototypes must be >= 1, got 0\n"), result.output
    assert "override 'model.head.prototypes=0'" in result.output and not run.exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.pipeline.masks.patch_size=0"], "data.pipeline.masks.patch_size = 0: must be >= 1"),
    (["data.pipeline.masks.patch_size=8"],
     r"data.pipeline.masks.patch_size \(8\) must equal model.patch_size \(16\)"),
    (["model.patch_size=8"],
     r"data.pipeline.masks.patch_size \(16\) must equal model.patch_size \(8\)"),
    (["model.patch_size=0"], "model.patch_size must be an integer > 0"),
    (["data.pipeline.views.global_size=100"],
     r"data.pipeline.views.global_size = 100: not a multiple of data.pipeline.masks.patch_size "
     r"\(16\)"),
    (["data.pipeline.views.local_size=40"],
     r"data.pipeline.views.local_size \(40\) must be a multiple of model.patch_size \(16\)"),
    (["data.pipeline.views.n_local=2.5"], "data.pipeline.views.n_local = 2.5: must be an integer"),
    (["data.pipeline.views.global_scale=[0.3]"],
     r"data.pipeline.views.global_scale = \(0.3,\): must be a list of 2 numbers"),
    (["data.pipeline.views.nlocal=2"], r"data.pipeline.views.nlocal: unknown key \(ViewConfig"),
    (["data.pipeline.views.local.blur_p=x"], "data.pipeline.views.local.blur_p = 'x': must be a "
                                             "number"),
    (["data.pipeline.masks=3"], "data.pipeline.masks = 3: expected a mapping"),
    (["data.pipeline=3"], "data.pipeline must be a mapping"),
    (["data.pipeline.prefetch=0"], "data.pipeline.prefetch = 0"),
    (["data.num_threads=0"], "data.num_threads must be an integer > 0"),
])
def test_bad_pipeline_values_name_the_full_key_and_the_override(overrides, message):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(overrides[0]))} "
                                          rf"\(over \S*tiny_cpu\.yaml\): {message}"):
        load_config("tiny_cpu", overrides)


def test_matching_patch_sizes_are_accepted():
    from tcore.train import pipeline_config
    cfg = load_config("tiny_cpu", ["model.patch_size=8", "data.pipeline.masks.patch_size=8"])
    assert pipeline_config(cfg).masks.patch_size == 8


def test_pipeline_config_errors_start_with_the_key():
    """Outside a training config the key is relative to PipelineConfig (bench --set, Python)."""
    for values, key in (({"views": {"nlocal": 2}}, "views.nlocal: unknown key"),
                        ({"masks": {"patch_size": 0}}, "masks.patch_size = 0"),
                        ({"views": {"blur_sigma": [1.0]}}, "views.blur_sigma = "),
                        ({"shuffle_buffer": 1.5}, "shuffle_buffer = 1.5: must be an integer"),
                        ({"skip_bad_samples": "yes"}, "skip_bad_samples = 'yes': must be true")):
        with pytest.raises(PipelineConfigError) as info:
            PipelineConfig.from_dict(values).validate()
        assert str(info.value).startswith(key), str(info.value)
    config = PipelineConfig()
    config.views.n_local = 2.5                      # set directly, not through from_dict
    with pytest.raises(PipelineConfigError, match="views.n_local = 2.5"):
        config.validate()


# --- manifest and index must agree ---------------------------------------------------------

def test_manifest_sample_count_must_match_the_index(synth_shards, tmp_path):
    shards = _copy(synth_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1         # 6 for a 5-sample shard: 1 sample repeated
    manifest["total_samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match=r"shard-000000.tar: manifest.json says 6 samples, "
                                            r"its index .*shard-000000.idx lists 5: rebuild"):
        load_shard_set([shards])


def test_index_of_another_shard_is_found(synth_shards, tmp_path):
    shards = _copy(synth_shards, tmp_path)
    # same count; the smaller shard's index on the larger tar, so that the tar is long enough
    small, large = sorted(["shard-000000", "shard-000001"],
                          key=lambda name: (shards / f"{name}.tar").stat().st_size)
    shutil.copy(shards / f"{small}.idx", shards / f"{large}.idx")
    first = read_index(shards / f"{small}.idx")[0][0][3]
    with pytest.raises(ShardSetError, match=f"{large}.tar: index .* does not match the "
                                            f"tar \\(its index lists {first} .*rebuild"):
        load_shard_set([shards])


def test_stale_index_after_a_member_was_renamed_is_found(synth_shards, tmp_path):
    """Same sizes and offsets, another name at the end (a tar rebuilt, its index not)."""
    shards = _copy(synth_shards, tmp_path)
    tar = shards / "shard-000002.tar"
    _ext, offset, _size, name = read_index(shards / "shard-000002.idx")[-1][-1]
    data = bytearray(tar.read_bytes())
    header = offset - 512
    renamed = b"zz" + name.encode()[2:]
    data[header:header + len(renamed)] = renamed
    # Fix the header checksum so the tar itself stays valid.
    data[header + 148:header + 156] = b" " * 8
    checksum = sum(data[header:header + 512])
    data[header + 148:header + 156] = b"%06o\0 " % checksum
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match=f"shard-000002.tar: index .*lists {name} .*the tar "
                                            f"has zz"):
        load_shard_set([shards])
    assert issubclass(ShardSetError, ShardDirError) and issubclass(ShardSetError, ValueError)


def test_intact_shards_still_load(synth_shards):
    shard_set = load_shard_set([synth_shards])
    assert shard_set.total_samples == 12 and len(shard_set.tars) == 3
    assert load_shard_set(shard_set) is shard_set     # tcore train's loader: read once


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(synth_shards, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(synth_shards), "--output",
                                       str(tmp_path / "run"), "train.device=cuda"])
    _assert_clean_error(result, "train.device=cuda but no CUDA device is visible")


def test_loader_needs_a_thread(synth_shards):
    from tcore.pipelines.loader import build_loader
    with pytest.raises(ValueError, match="num_threads = 0"):
        build_loader([synth_shards], 2, num_threads=0)


# --- a file that is not a manifest where a shard directory is expected ---------------------

TAR_GIVEN = {
    "train": ["train", "--output", "{tmp}/run", "--max-steps", "1", "--no-progress", *TRAIN_FAST],
    "preview": ["pipeline", "preview", "--output", "{tmp}/p.png", "--batch-size", "2",
                "--local-crops", "0"],
}


@pytest.mark.parametrize("command", ["train", "preview", "inspect"])
def test_a_shard_tar_given_as_the_data_is_a_clean_error(command, synth_shards, tmp_path):
    """A real VP9 shard tar (binary, not UTF-8) once ended in a UnicodeDecodeError traceback."""
    tar = synth_shards / "shard-000000.tar"
    if command == "inspect":
        args = ["shards", "inspect", str(tar)]
    else:
        args = [a.format(tmp=tmp_path) for a in TAR_GIVEN[command]] + ["--data", str(tar)]
    result = CliRunner().invoke(main, args)
    _assert_clean_error(result, re.escape(f"{tar}: not a manifest.json (binary data, not JSON "
                                          f"text); it is a shard tar: pass the shard directory "
                                          f"that holds it ({synth_shards})"))


def test_a_binary_or_text_file_that_is_not_a_manifest_is_named(synth_shards, tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)))
    with pytest.raises(ShardDirError, match=re.escape(f"{blob}: not a manifest.json (binary data, "
                                                      "not JSON text); pass a shard directory")):
        load_shard_set([blob])
    index = synth_shards / "shard-000000.idx"   # text, not JSON
    result = CliRunner().invoke(main, ["shards", "inspect", str(index)])
    _assert_clean_error(result, re.escape(f"{index}: not valid JSON (") + ".*pass a shard directory")
