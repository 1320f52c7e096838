"""`tcore demo` touches only a directory it made (a `demo.json` marker), a killed demo leaves no
summary naming deleted files, and bad `tcore data synth` / `tcore demo` input is one clear
message naming the option or file, never a traceback."""
import json
import os
import signal
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from tcore.cli import main as cli
from tcore.commands.data import synth as synth_command
from tcore.commands.demo import demo as demo_command
from tcore.demo import claim_output
from tcore.preprocess.synth import make_synthetic

SHORT_DEMO = ["--steps", "1", "--videos", "1", "--no-progress"]
TINY_SYNTH = ["--videos", "1", "--frames", "2", "--size", "32x32", "--davis-videos", "0"]


def _invoke(args):
    result = CliRunner().invoke(cli, args)
    # A click error (SystemExit), not a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    project = tmp_path / "proj"
    (project / "run").mkdir(parents=True)
    (project / "run" / "my_experiment.ckpt").write_text("precious")
    result = _invoke(["demo", "--output", str(project), *SHORT_DEMO])
    assert result.exit_code == 1
    assert f"--output {project}: not empty and not made by `tcore demo` (no demo.json)" in result.output
    assert "choose another --output or empty it" in result.output
    assert (project / "run" / "my_experiment.ckpt").read_text() == "precious"
    assert sorted(p.name for p in project.iterdir()) == ["run"]  # nothing added either


def test_demo_output_that_is_a_file_or_under_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    result = _invoke(["demo", "--output", str(afile), *SHORT_DEMO])
    assert result.exit_code == 1 and f"--output {afile}: is a file, not a directory" in result.output
    result = _invoke(["demo", "--output", str(afile / "sub"), *SHORT_DEMO])
    assert result.exit_code == 1 and (f"--output {afile / 'sub'}: {afile} is a file, not a "
                                      "directory") in result.output
    assert afile.read_text() == "keep"


def test_demo_rerun_after_a_kill_clears_only_its_own_results(tmp_path):
    out = tmp_path / "demo"
    # An earlier demo's results, as a finished run leaves them (test_demo.py runs one whole):
    # the marker, the summary naming the rest, and each of its folders.
    claim_output(out)
    assert json.loads((out / "demo.json").read_text())["made_by"] == "tcore demo"
    for name in ("synthetic", "shards", "run", "eval"):
        (out / name).mkdir()
        (out / name / "stale.txt").write_text("old")
    (out / "summary.json").write_text(json.dumps({"paths": {"run": str(out / "run")}}))
    (out / "loss_curve.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")                # the user's file next to the demo's

    # A rerun with more steps than the preset's schedules (a note says so), killed as soon as
    # it generates videos: the old summary and results are gone, not left pointing nowhere.
    command = [sys.executable, "-m", "tcore.cli", "demo", "--output", str(out), "--steps", "400",
               "--videos", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # The note comes once the old results are cleared; the new synth.json then shows
        # the videos are being made.
        note = process.stdout.readline().decode()
        assert note == "note: --steps 400 is more than the tiny_cpu schedules' 300 steps: training 300\n"
        deadline = time.monotonic() + 60
        while not (out / "synthetic" / "synth.json").exists():
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the demo never started its videos"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()  # no-op once killed; ends it if an assertion above failed
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists() and not (out / "loss_curve.png").exists()
    assert not (out / "run").exists() and not (out / "eval").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "demo.json").exists()

    again = _invoke(["demo", "--output", str(out), *SHORT_DEMO])   # `make demo` twice in a row
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "notes.txt").read_text() == "mine" and not (out / "run" / "stale.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "abc"], "Invalid value for '--size': expected WxH such as 160x128, got 'abc'"),
    (["--size", "160x"], "Invalid value for '--size': expected WxH such as 160x128, got '160x'"),
    (["--davis-size", "8x8"], "Invalid value for '--davis-size': synthetic video size must be at least 16x16"),
    (["--davis-frames", "0"], "Invalid value for '--davis-frames': 0 is not in the range x>=3"),
    # eval davis refuses a sequence of fewer than 3 frames: such a set could not be scored
    (["--davis-frames", "2"], "Invalid value for '--davis-frames': 2 is not in the range x>=3"),
    (["--videos", "-1"], "Invalid value for '--videos'"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--videos", "0", "--davis-videos", "0"], "--videos and --davis-videos are both 0: nothing would be written"),
])
def test_synth_bad_options_name_the_option(tmp_path, args, message):
    result = _invoke(["data", "synth", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_synth_empty_dataset_refused_by_the_library_too(tmp_path):
    with pytest.raises(ValueError, match="videos and davis_videos are both 0"):
        make_synthetic(tmp_path / "out", videos=0, davis_videos=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, problem", [
    ('{"params": ', "not valid JSON"),
    ('{"complete": true}', "not a synthetic dataset record (no `params` object)"),
    ('[1, 2]', "not a synthetic dataset record (no `params` object)"),
])
def test_synth_bad_record_names_synth_json(tmp_path, record, problem):
    out = tmp_path / "out"
    out.mkdir()
    (out / "synth.json").write_text(record)
    result = _invoke(["data", "synth", str(out), *TINY_SYNTH])
    assert result.exit_code == 1 and f"{out / 'synth.json'}: {problem}" in result.output, result.output
    assert (out / "synth.json").read_text() == record


def test_synth_out_not_creatable_is_path_and_reason(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    result = _invoke(["data", "synth", str(afile / "sub"), *TINY_SYNTH])
    assert result.exit_code == 1 and (f"{afile / 'sub'}: {afile} is a file, not a "
                                      "directory") in result.output, result.output


def test_synth_zero_training_videos_reports_only_what_it_wrote(tmp_path):
    result = _invoke(["data", "synth", str(tmp_path / "out"), "--videos", "0", "--davis-videos", "1",
                      "--davis-frames", "3", "--davis-size", "32x32"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{tmp_path / 'out' / 'davis'}: 1 DAVIS-layout videos"


@pytest.mark.parametrize("command", [synth_command, demo_command], ids=["data synth", "demo"])
def test_every_option_has_help(command):
    missing = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_synth_rerun_with_the_same_options_says_it_reused_the_dataset(tmp_path):
    out = tmp_path / "out"
    first = _invoke(["data", "synth", str(out), *TINY_SYNTH])
    assert first.exit_code == 0 and "reused" not in first.output, first.output
    again = _invoke(["data", "synth", str(out), *TINY_SYNTH])
    assert again.exit_code == 0
    assert again.output.strip().endswith("(already there, made with these options: reused as is)")
