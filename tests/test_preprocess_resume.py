"""A real `tcore shards build` process killed with SIGKILL mid-way, then rerun, ends with
exactly the shards of an uninterrupted build."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcore.preprocess.manifest import load_manifest
from tcore.preprocess.shards import build_shards, run_build

# One video per shard and a slower VP9 setting leave a wide window to kill the build mid-way.
OPTIONS = dict(frames=20, short_side=128, samples_per_shard=1, vp9_speed=4)
CLI_OPTIONS = ["--frames", "20", "--short-side", "128", "--samples-per-shard", "1", "--vp9-speed", "4",
               "--no-progress"]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _build_command(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "tcore.cli", "shards", "build", str(src), str(out), *CLI_OPTIONS,
            "--workers", str(workers)]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_build_then_rerun_equals_uninterrupted_build(synth_root, tmp_path, workers):
    src = synth_root / "train"
    reference = tmp_path / "reference"
    build_shards(src, reference, progress=False, **OPTIONS)
    shard_count = len(load_manifest(reference)["shards"])
    assert shard_count == 12

    out = tmp_path / "killed"
    process = subprocess.Popen(_build_command(src, out, workers), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Kill as soon as a first shard is complete: the build is then mid-way (other
        # shards' temporary tars are usually being written).
        deadline = time.monotonic() + 120
        while not list((out / ".build").glob("shard-*.json")):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "build never finished its first shard"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert 1 <= len(done) < shard_count

    rerun = subprocess.run(_build_command(src, out, workers), capture_output=True, text=True, check=True)
    assert "already done" in rerun.stdout and "videos/s" in rerun.stdout
    assert _files(out) == _files(reference)  # no partial, missing or duplicate samples
    assert not list(out.rglob("*.tmp*"))


def test_a_finished_shard_whose_tar_or_index_is_gone_is_rebuilt(synth_root, tmp_path):
    """A shard's record says it is done, but its tar (or its index) was deleted since: a rerun
    builds that shard again, the same bytes, and leaves the others alone."""
    options = dict(frames=4, short_side=64, samples_per_shard=5, progress=False)
    out = tmp_path / "out"
    build_shards(synth_root / "train", out, **options)
    before = _files(out)
    (out / "shard-000001.tar").unlink()
    (out / "shard-000002.idx").unlink()
    result = run_build(synth_root / "train", out, **options)
    assert (result.built_shards, result.skipped_shards) == (2, 1)
    assert _files(out) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_mid_build_says_how_to_go_on_and_exits_130(synth_root, tmp_path, workers):
    """SIGINT (Ctrl-C) printed click's bare "Aborted!" with status 1: now it says the
    finished shards are kept and to rerun, exits 130 as a shell reports Ctrl-C, and leaves
    no temporaries; the rerun finishes the build."""
    src, out = synth_root / "train", tmp_path / "interrupted"
    process = subprocess.Popen(_build_command(src, out, workers), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / ".build").glob("shard-*.json")):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "build never finished its first shard"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, output[-2000:]
    assert f"interrupted; the finished shards in {out} are kept: rerun the same command" in output
    assert "Aborted!" not in output and "Traceback" not in output, output[-2000:]
    assert not list(out.glob("*.tmp-*"))
    subprocess.run(_build_command(src, out, workers), capture_output=True, text=True, check=True)
    assert load_manifest(out, check_files=True)["total_samples"] == 12
