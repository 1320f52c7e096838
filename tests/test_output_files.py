"""Every file tcore writes goes through `write_atomically`: on a full disk (a real file-size
limit, in a child process) each writer raises an OutputWriteError naming its output, the
earlier version of that output is left whole and no temporary is left behind; the CLI then
prints one line, not a traceback."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from full_disk import file_size_limit
from reference_paths import OFFICIAL_TINY

# Run in a child: writes every output once with room, then again with no room (RLIMIT_FSIZE
# 0 refuses any byte), and reports what each second write raised and what the folder holds.
WRITERS = textwrap.dedent('''
    import json, os, resource, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from tcore.bench.report import write_json_atomic as bench_json
    from tcore.checkpoint import atomic_torch_save
    from tcore.config import load_config, save_config
    from tcore.eval.io import write_csv, write_json, write_label_png, write_mat, write_png
    from tcore.metrics_log import MetricsLogger
    from tcore.models import build_backbone, export_reference, export_safetensors
    from tcore.preprocess.manifest import write_json_atomic, write_jsonl_atomic

    root = Path(sys.argv[1])
    backbone = build_backbone("vit_tiny")

    def log_a_step(path):   # metrics.jsonl is appended to, not replaced
        logger = MetricsLogger(path.parent, 0, 1, 4, progress=False, tensorboard=False)
        try:
            logger.log([(1, {"total": 1.0})], {"lr": 0.1})
        finally:
            logger.close()

    writers = {
        "checkpoint.pt": lambda p: atomic_torch_save({"x": torch.zeros(1000)}, p),
        "config.yaml": lambda p: save_config(load_config("tiny_cpu"), p),
        "bench.json": lambda p: bench_json(p, {"a": 1}),
        "results.json": lambda p: write_json(p, {"a": 1}),
        "frame.png": lambda p: write_png(p, np.zeros((4, 4, 3), np.uint8)),
        "labels.png": lambda p: write_label_png(p, np.zeros((4, 4), np.uint8)),
        "results.mat": lambda p: write_mat(p, {"a": np.zeros(3)}),
        "per_sequence.csv": lambda p: write_csv(p, [{"a": 1.0}]),
        "teacher.safetensors": lambda p: export_safetensors(backbone, p, durable=True),
        "reference.pth": lambda p: export_reference(backbone, p),
        "manifest.json": lambda p: write_json_atomic(p, {"a": 1}),
        "failures.jsonl": lambda p: write_jsonl_atomic(p, [{"a": 1}]),
        "metrics.jsonl": log_a_step,
    }
    before = {}
    for name, write in writers.items():
        (root / name).mkdir()
        write(root / name / name)
        before[name] = (root / name / name).read_bytes()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    report = {}
    for name, write in writers.items():
        try:
            write(root / name / name)
            raised = None
        except BaseException as error:
            raised = [type(error).__name__, isinstance(error, OSError), str(error)]
        report[name] = {"raised": raised,
                        "kept": (root / name / name).read_bytes() == before[name],
                        "files": sorted(p.name for p in (root / name).iterdir())}
    print(json.dumps(report))
''')


def test_every_writer_on_a_full_disk_names_its_output_and_keeps_the_old_one(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert len(report) == 13
    for name, outcome in report.items():
        assert outcome["raised"] == [
            "OutputWriteError", True, f"{tmp_path / name / name}: cannot write: File too large"
        ], name
        assert outcome["kept"] and outcome["files"] == [name], (name, outcome)


def test_a_command_whose_output_cannot_be_written_says_so_in_one_line(synth_shards, tmp_path):
    output = tmp_path / "preview.png"
    command = [sys.executable, "-m", "tcore.cli", "pipeline", "preview", "--data",
               str(synth_shards), "--output", str(output), "--batch-size", "2"]
    # Room for the small files the pipeline writes as it starts, not for the PNG (~680 KB).
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(20_000))
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"Error: {output}: cannot write: File too large"
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# ---- every command checks its output path the same way, before its work ---------------------

def output_commands(shards, src, davis):
    """Each command that writes a folder or file, as a function of that path -> (the
    command line, the path its message names after the option)."""
    return {
        "data synth": lambda out: ["data", "synth", out, "--videos", "1", "--frames", "2",
                                   "--size", "32x32", "--davis-videos", "0"],
        "shards build": lambda out: ["shards", "build", src, out, "--no-progress"],
        "train": lambda out: ["train", "--data", shards, "--output", out, "--max-steps", "1",
                              "--no-progress", "model.head.prototypes=256"],
        "pipeline preview": lambda out: ["pipeline", "preview", "--data", shards,
                                         "--output", f"{out}/grid.png"],
        "demo": lambda out: ["demo", "--output", out, "--steps", "1", "--no-progress"],
        "bench --json": lambda out: ["bench", "model", "--arch", "vit_tiny", "--batch", "1",
                                     "--json", f"{out}/bench.json"],
        "bench --profile": lambda out: ["bench", "model", "--arch", "vit_tiny", "--batch", "1",
                                        "--profile", out],
        "eval davis": lambda out: ["eval", "davis", "--data", davis, "--checkpoint",
                                   str(OFFICIAL_TINY), "--size", "native", "--output", out],
        # the output is checked before the scoring (an existing folder stands for results)
        "eval davis-score": lambda out: ["eval", "davis-score", "--data", davis, "--results",
                                         davis, "--output", out],
    }


def shown_path(command: list[str], out: str) -> str:
    """How the message begins: the option and the user's path, or the path alone for a
    positional OUT."""
    for option in ("--output", "--json", "--profile"):
        if option in command:
            return f"{option} {command[command.index(option) + 1]}"
    return out


def test_every_command_refuses_an_unusable_output_in_the_same_words(synth_root, synth_shards,
                                                                    tmp_path):
    """A file in the way (the output itself or a folder above it), a name the OS will not look
    up and a folder it will not make: one line, worded alike by every command, naming the
    user's path and which part of it is a file; nothing written, the file kept."""
    from click.testing import CliRunner

    from tcore.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep")
    too_long = str(tmp_path / ("x" * 300))
    too_long_below_a_new_folder = str(tmp_path / "new" / ("x" * 300))   # no lookup sees it
    refused_by_os = "/sys/tcore-test-output" if Path("/sys/kernel").is_dir() else None
    commands = output_commands(str(synth_shards), str(synth_root / "train"),
                               str(synth_root / "davis"))
    for name, command_for in commands.items():
        for out, said in ((str(afile / "sub"), f"{afile} is a file, not a directory"),
                          (too_long, "cannot be used: File name too long"),
                          (too_long_below_a_new_folder, "cannot be used: File name too long"),
                          (refused_by_os, "cannot write: ")):
            if out is None:
                continue
            command = command_for(out)
            result = CliRunner().invoke(main, command)
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
                name, result.output)
            assert "Traceback" not in result.output
            assert result.output.startswith(f"Error: {shown_path(command, out)}: {said}"), (
                name, result.output)
    # The output itself a file: a folder is needed (a file output: its folder is the file).
    for name, command_for in commands.items():
        if name in ("data synth", "bench --profile", "eval davis", "eval davis-score"):
            # click's own check of a directory option says it
            continue
        command = command_for(str(afile))
        result = CliRunner().invoke(main, command)
        if name in ("pipeline preview", "bench --json"):
            said = f"{afile} is a file, not a directory"
        else:
            said = "is a file, not a directory"
        assert result.output.startswith(f"Error: {shown_path(command, str(afile))}: {said}"), (
            name, result.output)
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_output_file_path_is_refused_before_any_work(tmp_path):
    """`make_output_file_directory`: its folder made; a folder at its path, or a name longer
    than the file system allows, refused naming the option."""
    from tcore.preprocess.files import OutputWriteError, make_output_file_directory

    made = make_output_file_directory(tmp_path / "new" / "report.json", "--json x")
    assert (tmp_path / "new").is_dir() and not made.exists()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []   # the probe removed
    (tmp_path / "folder.json").mkdir()
    for path, said in ((tmp_path / "folder.json", "--json x: is a directory, not a file"),
                       (tmp_path / ("y" * 300 + ".json"),
                        "--json x: cannot be used: File name too long")):
        try:
            make_output_file_directory(path, "--json x")
        except OutputWriteError as error:
            assert str(error) == said
        else:
            raise AssertionError(f"{path} was accepted")
