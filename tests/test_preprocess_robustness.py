"""The shard builder and inspector facing what goes wrong: a worker process killed mid-build,
an encoder that refuses its settings, a full disk, a truncated shard, a manifest given as a file, an
output path that is a file, every input failing. Each ends in a clear error (or reported
problem), never a hang or a traceback, and keeps what was already written."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tqdm import tqdm

from tcore.cli import main as cli
from tcore.preprocess.discover import discover_class_folders
from tcore.preprocess.errors import ShardDirError
from tcore.preprocess.files import OutputWriteError
from tcore.preprocess.index import format_index
from tcore.preprocess.locks import DirectoryBusy, exclusive_lock
from tcore.preprocess.manifest import load_manifest
from tcore.preprocess.shards import BuildConfig, BuildError, _run_pool, build_one_shard, run_build
from tcore.preprocess.tarwriter import ShardTarWriter
from tcore.preprocess.verify import inspect_shards
from tcore.preprocess.video import encode_clip, read_clip
from full_disk import file_size_limit
from processes import children_of
from shard_files import read_tar


def _build_command(src: Path, out: Path) -> list[str]:
    # Two inputs per shard and a slow VP9 setting: each shard takes a good fraction of a second.
    return [sys.executable, "-m", "tcore.cli", "shards", "build", str(src), str(out), "--frames", "20",
            "--short-side", "128", "--samples-per-shard", "2", "--vp9-speed", "2", "--workers", "2",
            "--no-progress"]


def test_a_worker_killed_mid_shard_stops_the_build_naming_the_shard_and_a_rerun_resumes(synth_root, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_build_command(synth_root / "train", out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen, victim = set(), None
    try:
        deadline = time.monotonic() + 60
        # Once a first shard is finished, kill a worker that is writing its shard (its
        # temporary tar, named after its pid, exists until the shard is complete).
        while victim is None:
            assert process.poll() is None, "the build ended before a worker could be killed"
            assert time.monotonic() < deadline, "no worker caught mid-shard"
            if list((out / ".build").glob("shard-*.json")):
                for pid in children_of(process.pid):
                    seen.add(pid)
                    partial = list(out.glob(f"shard-*.tar.tmp-{pid}"))
                    if partial:
                        victim, shard = pid, partial[0].name.split(".")[0]
                        os.kill(pid, signal.SIGKILL)
                        break
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=60)  # it used to wait forever
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stdout + stderr
    assert f"(pid {victim}) died while building {shard}" in stderr and "SIGKILL" in stderr
    assert "Traceback" not in stderr and "rerun the same command to resume" in stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp-*"))
    assert not [pid for pid in seen if Path(f"/proc/{pid}").exists()]  # no worker left behind
    finished = {p.name: p.read_bytes() for p in out.glob("shard-*") if p.suffix in (".tar", ".idx")}
    records = len(list((out / ".build").glob("shard-*.json")))
    assert finished and records >= 1 and f"{shard}.tar" not in finished

    rerun = subprocess.run(_build_command(synth_root / "train", out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{records} already done" in rerun.stdout
    manifest = load_manifest(out, check_files=True)
    assert manifest["total_samples"] == 12 and len(manifest["shards"]) == 6 and manifest["failures"] == 0
    assert all((out / name).read_bytes() == data for name, data in finished.items())  # not rebuilt
    assert not list(out.rglob("*.tmp*"))


@pytest.mark.parametrize("codec, crf, limit", [("vp9", 64, 63), ("h264", 52, 51), ("vp9", -1, 63)])
def test_an_out_of_range_crf_is_refused_before_any_work(synth_root, tmp_path, codec, crf, limit):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["shards", "build", str(synth_root / "train"), str(out),
                                      "--codec", codec, "--crf", str(crf), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"crf for {codec} must be in 0..{limit}, got {crf}" in result.output
    assert not out.exists()
    BuildConfig(codec=codec, crf=limit).validate()  # the bounds themselves are accepted
    BuildConfig(codec=codec, crf=0).validate()


def test_an_encoder_that_refuses_its_settings_stops_the_build_naming_the_sample(synth_root, tmp_path):
    # Past validate(), libvpx-vp9 refuses crf 64 when it opens: the same for every input, so
    # a shard with nothing built stops the build (it used to "build" shards of failures and
    # exit 0). An unexpected error among built samples is logged instead.
    config = BuildConfig(frames=20, short_side=64, crf=64, samples_per_shard=2)
    inputs = discover_class_folders(synth_root / "train", "video")
    items = [(i, inputs.sources[i], inputs.label(inputs.sources[i].class_name)) for i in range(4)]
    (tmp_path / ".build").mkdir()
    with pytest.raises(BuildError, match=f"shard-000000: no sample built; {inputs.sources[0].relative} "
                                         "failed with OverflowError"):
        build_one_shard(tmp_path, config, 0, items[:2])
    assert not list((tmp_path / ".build").iterdir())  # no record: a rerun rebuilds the shard
    # The same error raised in a worker process reaches the build.
    tasks = [(tmp_path, config, 0, items[:2]), (tmp_path, config, 1, items[2:])]
    with pytest.raises(BuildError, match="failed with OverflowError"):
        _run_pool(tasks, 2, {}, tqdm(disable=True))
    assert not list((tmp_path / ".build").iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_the_build_naming_the_shard_and_a_rerun_finishes(synth_root, tmp_path,
                                                                            workers):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tcore.cli", "shards", "build", str(synth_root / "train"),
               str(out), "--short-side", "128", "--samples-per-shard", "4", "--workers",
               str(workers), "--no-progress"]
    # A shard of 4 samples is ~70 KB: no shard can be written whole.
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(50_000))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"Error: {out / 'shard-000000.tar'}: cannot write: File too large; the build stops"
            in done.stderr) or (f"Error: {out / 'shard-000001.tar'}: cannot write" in done.stderr)
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temporary holds the space
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert load_manifest(out)["total_samples"] == len(discover_class_folders(synth_root / "train").sources)


def test_a_busy_lock_does_not_name_a_holder_killed_before(tmp_path):
    """A lock file keeps the line of a holder killed -9; while others hold the lock shared,
    a process refused it named that dead pid as the one building."""
    lock = tmp_path / "lock"
    lock.write_text(f"pid 999999999 on {os.uname().nodename}\n")   # no such process
    with open(lock) as shared:
        import fcntl
        fcntl.flock(shared, fcntl.LOCK_SH)
        with pytest.raises(DirectoryBusy, match=r"^held by processes that share the lock$"):
            with exclusive_lock(lock, lambda holder: f"held by {holder}"):
                pass


HOLD_THE_BUILD_LOCK = ("import sys, time; from pathlib import Path\n"
                       "from tcore.preprocess.shards import _build_lock\n"
                       "with _build_lock(Path(sys.argv[1]), 0, 2):\n"
                       "    print('holding', flush=True); time.sleep(300)")


def test_a_second_build_of_the_same_node_stops_naming_the_first(synth_root, tmp_path):
    """Node 0 of a split build is running (a real process holds its lock): a second node 0
    stops at once naming it, and so does a build of the whole input set (its start-up sweep
    would remove node 0's temporaries, and its shards overlap); node 1 builds beside it; once
    node 0's process is gone, node 0 builds."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_BUILD_LOCK, str(out)],
                              stdout=subprocess.PIPE, text=True)

    def build(node: int, nodes: int = 2):
        return CliRunner().invoke(cli, ["shards", "build", str(synth_root / "train"), str(out),
                                        "--short-side", "64", "--samples-per-shard", "3",
                                        "--node-rank", str(node), "--num-nodes", str(nodes),
                                        "--no-progress"])
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = build(0)
        assert refused.exit_code == 1, refused.output
        assert (f"{out}: another tcore shards build (pid {holder.pid} on ") in refused.output
        assert "as node 0 of 2 is building into this directory" in refused.output
        whole = build(0, nodes=1)
        assert whole.exit_code == 1 and (f"{out}: a build split over nodes is building into "
                                         "this directory") in whole.output, whole.output
        assert not list(out.glob("shard-*"))
        beside = build(1)
        assert beside.exit_code == 0, beside.output
        shards = -(-len(discover_class_folders(synth_root / "train").sources) // 3)
        assert shards >= 3
        assert sorted(p.name for p in out.glob("shard-*.tar")) == [
            f"shard-{k:06d}.tar" for k in range(1, shards, 2)]
    finally:
        holder.kill()
        holder.wait()
    assert build(0).exit_code == 0
    assert len(list(out.glob("shard-*.tar"))) == shards


def test_inspect_verify_reports_a_truncated_shard(synth_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    with open(copy / "shard-000001.tar", "r+b") as handle:
        handle.truncate(20000)
    result = CliRunner().invoke(cli, ["shards", "inspect", str(copy), "--verify"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "BAD shard-000001.tar: truncated or corrupt tar" in result.output
    assert "(truncated tar)" in result.output  # the samples past the cut, one by one
    problems = inspect_shards(copy, verify=True)["problems"]
    assert problems and {p["tar"] for p in problems} == {"shard-000001.tar"}
    # Without --verify, nothing decoded: the size the build recorded gives it away.
    quick = CliRunner().invoke(cli, ["shards", "inspect", str(copy)])
    assert quick.exit_code == 1, quick.output
    assert re.search(r"BAD shard-000001\.tar: 20000 bytes, the build wrote \d+ \(truncated",
                     quick.output), quick.output
    assert CliRunner().invoke(cli, ["shards", "inspect", str(synth_shards)]).exit_code == 0


def test_inspect_names_a_tar_the_manifest_does_not_list(synth_shards, tmp_path):
    # It said "3 shards" and exit 0, while the loader never reads the fourth tar.
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    shutil.copy(copy / "shard-000002.tar", copy / "shard-000003.tar")
    for verify in ([], ["--verify"]):
        result = CliRunner().invoke(cli, ["shards", "inspect", str(copy), *verify])
        assert result.exit_code == 1, result.output
        assert "BAD shard-000003.tar: not listed in manifest.json, so never trained on" \
            in result.output
    problems = inspect_shards(copy)["problems"]
    assert [p["tar"] for p in problems] == ["shard-000003.tar"]


def test_inspect_verify_reports_samples_that_disagree_with_their_json_index_or_manifest(synth_shards, tmp_path):
    """Every check of `inspect --verify` on shards that are valid tars: a .cls that is not the
    json's label, a clip with 19 frames where the manifest says T = 20, an index that lists 4 of
    its tar's 5 samples, an index whose header counts a sample it does not list."""
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    tar0 = copy / "shard-000000.tar"
    samples = read_tar(tar0)
    keys = list(samples)
    label = json.loads(samples[keys[0]]["json"])["label"]
    samples[keys[0]]["cls"] = str(label + 1).encode()
    (tmp_path / "clip.webm").write_bytes(samples[keys[1]]["webm"])
    clip = read_clip(str(tmp_path / "clip.webm"), 19, 0)  # same size, one frame short
    samples[keys[1]]["webm"] = encode_clip(clip.frames, "vp9", gop=20)
    with ShardTarWriter(tar0) as writer:
        for key, components in samples.items():
            writer.add_sample(key, [(ext, components[ext]) for ext in ("webm", "json", "cls")])
    (copy / "shard-000000.idx").write_text(format_index(writer.samples))
    lines = (copy / "shard-000001.idx").read_text().splitlines()
    assert lines[0] == "v1.2 5"
    (copy / "shard-000001.idx").write_text("\n".join(["v1.2 4", *lines[1:5]]) + "\n")
    lines = (copy / "shard-000002.idx").read_text().splitlines()
    assert lines[0] == "v1.2 2"
    (copy / "shard-000002.idx").write_text("\n".join(["v1.2 3", *lines[1:]]) + "\n")

    problems = inspect_shards(copy, verify=True)["problems"]
    found = sorted((p["tar"], p["key"] or "", p["error"].split(" (")[0].split(",")[0]) for p in problems)
    assert found == sorted([
        ("shard-000000.tar", keys[0], f"cls b'{label + 1}' disagrees with json label {label}"),
        ("shard-000000.tar", keys[1], "clip decodes to 19 frames of 160x128"),
        ("shard-000001.tar", "", "index does not match the tar"),
        ("shard-000001.tar", "", "manifest says 5 samples"),
        ("shard-000002.tar", "", f"{copy / 'shard-000002.idx'}: header says 3 samples"),
    ]), problems
    # The first member where index and tar part (where the counts alone could agree).
    mismatch = next(p["error"] for p in problems if "index does not match" in p["error"])
    assert re.search(r"\(12 indexed members, 15 in tar; member 13: index none, tar \S+\.webm "
                     r"at byte \d+, \d+ bytes\)$", mismatch), mismatch


def test_inspect_accepts_the_manifest_file(synth_shards):
    result = CliRunner().invoke(cli, ["shards", "inspect", str(synth_shards / "manifest.json"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verify: 0 problem(s)" in result.output
    assert inspect_shards(synth_shards / "manifest.json")["directory"] == str(synth_shards)


def test_an_output_path_that_is_a_file_is_a_clear_error(synth_root, tmp_path):
    src = str(synth_root / "train")
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    result = CliRunner().invoke(cli, ["shards", "build", src, str(existing), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"Error: {existing}: is a file, not a directory" in result.output
    assert existing.read_text() == "keep me\n"
    with pytest.raises(OutputWriteError, match="is a file, not a directory"):
        run_build(src, existing, progress=False)
    # Below a file: the OS error, as one line naming the path.
    result = CliRunner().invoke(cli, ["shards", "build", src, str(existing / "out"), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"Error: {existing / 'out'}: {existing} is a file, not a directory" in result.output
    # An OUT the OS refuses to make (sysfs refuses mkdir to root too): one line naming it.
    if Path("/sys/kernel").is_dir():
        refused = "/sys/tcore-test-shards"
        result = CliRunner().invoke(cli, ["shards", "build", src, refused, "--no-progress"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert result.output.startswith(f"Error: {refused}: "), result.output


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def test_a_build_where_every_input_fails_stops_naming_failures_jsonl_and_a_rerun_retries(synth_root, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "clip.mp4").write_bytes(b"")
    (src / "a" / "readme.txt").write_text("notes, not a video\n")
    args = ["shards", "build", str(src), str(out), "--frames", "4", "--short-side", "64",
            "--samples-per-shard", "1", "--workers", "2", "--no-progress"]
    for _ in range(2):  # a rerun of the unchanged inputs says the same, not "not empty"
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert (f"Error: no sample was built: all 2 inputs failed; {out / 'failures.jsonl'} says "
                "why for each") in result.output
        assert "shards built" not in result.output
        # failures.jsonl alone: no manifest for a loader, no records or options for a rerun.
        assert sorted(p.name for p in out.iterdir()) == ["failures.jsonl"]
        assert [f["source"] for f in _failures(out)] == ["a/clip.mp4", "a/readme.txt"]
        assert "empty file" in _failures(out)[0]["error"]
    inspect = CliRunner().invoke(cli, ["shards", "inspect", str(out)])
    assert inspect.exit_code == 1 and "no sample was built? " in inspect.output, inspect.output
    # The empty clip replaced (same name) and a video added (other inputs): both are built.
    shutil.copy(next((synth_root / "train").rglob("*.mp4")), src / "a" / "clip.mp4")
    shutil.copy(next((synth_root / "train").rglob("*.webm")), src / "a" / "new.webm")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 samples in 2 shards" in result.output and "1 inputs failed" in result.output
    assert "2 shards built, 0 already done" in result.output
    manifest = load_manifest(out, check_files=True)
    assert (manifest["total_samples"], manifest["failures"]) == (2, 1)
    assert [f["source"] for f in _failures(out)] == ["a/readme.txt"]


def test_a_shard_whose_every_input_failed_is_not_counted_as_built(synth_root, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "bad.mp4").write_bytes(b"\x1a\x45\xdf\xa3 truncated")   # shard 0: fails
    shutil.copy(next((synth_root / "train").rglob("*.webm")), src / "a" / "good.webm")  # shard 1
    args = ["shards", "build", str(src), str(out), "--frames", "4", "--short-side", "64",
            "--samples-per-shard", "1", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "1 samples in 1 shards" in result.output and "1 inputs failed" in result.output
    assert "1 shards built, 0 already done" in result.output
    assert "0 shards built, 1 already done" in CliRunner().invoke(cli, args).output


def test_a_node_build_where_every_input_failed_is_not_merged(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "readme.txt").write_text("notes\n")
    for rank in range(2):   # node 1 has no shard at all; node 0's only input fails
        run_build(src, out, samples_per_shard=1, node_rank=rank, num_nodes=2, progress=False)
    result = CliRunner().invoke(cli, ["shards", "merge-manifest", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"no sample was built on any node: all 1 inputs failed; {out / 'failures.jsonl'}" in result.output
    assert not (out / "manifest.json").exists()
    assert [f["source"] for f in _failures(out)] == ["a/readme.txt"]


def test_class_folders_without_files_are_a_clear_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["shards", "build", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "the class folders of" in result.output and "hold no files" in result.output


def test_a_source_that_is_a_file_is_named_as_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a list, maybe\n")
    result = CliRunner().invoke(cli, ["shards", "build", str(notes), str(tmp_path / "out"),
                                      "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == (f"Error: input {notes} is a file, not a directory (a list of inputs "
                             "goes after --list)\n")


@pytest.mark.parametrize("prefix, rule", [("-x", "'-x' must not start with '-'"),
                                          ("a.b", "'a.b' must be a plain name (no dots"),
                                          ("", "must not be empty")])
def test_a_bad_prefix_names_the_rule_it_breaks(synth_root, tmp_path, prefix, rule):
    result = CliRunner().invoke(cli, ["shards", "build", str(synth_root / "train"),
                                      str(tmp_path / "out"), f"--prefix={prefix}", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"Error: prefix {rule}"), result.output


# One small video, two frames kept: a build of a fraction of a second.
_TINY = dict(frames=2, short_side=64, progress=False)


def _one_video(synth_root: Path, src: Path) -> Path:
    (src / "a").mkdir(parents=True)
    shutil.copy(next((synth_root / "train").rglob("*.webm")), src / "a" / "v.webm")
    return src


def test_a_prefix_with_glob_characters_has_its_stale_temporaries_removed(synth_root, tmp_path):
    """In a glob `[1]` is a character class: the prefix `k[1]` unescaped matched `k1-...`
    and never the build's own `k[1]-...` temporaries."""
    src, out = _one_video(synth_root, tmp_path / "src"), tmp_path / "out"
    run_build(src, out, prefix="k[1]", **_TINY)
    stale = [out / "k[1]-000000.tar.tmp-99999", out / "k[1]-000000.idx.tmp-99999",
             out / ".build" / ".k[1]-000000.json.tmp-99999"]   # as a kill -9 leaves them
    other = out / "k1-000000.tar.tmp-99999"                    # not this build's
    for path in [*stale, other]:
        path.write_bytes(b"partial")
    assert run_build(src, out, prefix="k[1]", **_TINY).skipped_shards == 1
    assert [path for path in stale if path.exists()] == [] and other.exists()


def test_a_rerun_removes_what_a_build_killed_while_renaming_its_files_left(synth_root, tmp_path):
    """kill -9 during the rename of manifest.json, failures.jsonl or .build/options.json
    leaves write_atomically's `.<name>.tmp-XXXXXXXX`. A rerun sweeps them at start-up, under
    the build lock (a live build's temporaries are never touched), and nothing else."""
    src, out = _one_video(synth_root, tmp_path / "src"), tmp_path / "out"
    run_build(src, out, **_TINY)
    stale = [out / ".manifest.json.tmp-k9x2ab7q", out / ".failures.jsonl.tmp-k9x2ab7q",
             out / ".build" / ".options.json.tmp-k9x2ab7q"]
    kept = [out / ".notes.json.tmp-k9x2ab7q", out / "manifest.json.tmp-1", out / "notes.txt"]
    for path in [*stale, *kept]:
        path.write_text("{}\n")
    with exclusive_lock(out / ".build" / "lock", lambda holder: "busy"):   # a build running
        with pytest.raises(DirectoryBusy):
            run_build(src, out, **_TINY)
    assert all(path.exists() for path in stale)
    assert run_build(src, out, **_TINY).skipped_shards == 1
    assert [path for path in stale if path.exists()] == [] and all(path.exists() for path in kept)
    assert load_manifest(out, check_files=True)["total_samples"] == 1


def test_changed_input_files_are_told_apart_from_changed_options(synth_root, tmp_path):
    src, out = _one_video(synth_root, tmp_path / "src"), tmp_path / "out"
    run_build(src, out, **_TINY)
    shutil.copy(src / "a" / "v.webm", src / "a" / "w.webm")   # a file added
    with pytest.raises(ShardDirError, match="^" + re.escape(
            f"{out} already holds shards built from another set of input files (1 then, 2 now; "
            "files were added, removed or renamed since; added: a/w.webm); use a new output "
            "directory, or build from the original files") + "$"):
        run_build(src, out, **_TINY)
    (src / "a" / "v.webm").unlink()   # so: v.webm renamed w.webm, as many files
    with pytest.raises(ShardDirError, match=re.escape(
            "from another set of input files (1, as then; files were added, removed or renamed "
            "since; removed: a/v.webm; added: a/w.webm; a broken file deleted from a class "
            "folder can be put back as an empty file at its path (it fails again, and the build "
            "resumes))")):
        run_build(src, out, **_TINY)
    # Other options too: both are said, the options by name.
    with pytest.raises(ShardDirError, match=re.escape(
            "built with other options (frames: 2 -> 3), and from another set of input files (1, as "
            "then; files were added, removed or renamed since; removed: a/v.webm; added: "
            "a/w.webm; a broken file deleted")):
        run_build(src, out, **{**_TINY, "frames": 3})
    (src / "b").mkdir()             # an empty class folder: another set of classes
    with pytest.raises(ShardDirError, match=re.escape("; classes added: b; removed: a/v.webm")):
        run_build(src, out, **_TINY)
