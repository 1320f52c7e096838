"""Every file tcore writes goes through `write_atomically`: on a full disk (a real file-size
limit, in a child process) each writer raises an OutputWriteError naming its output, the
earlier version of that output is left whole and no temporary is left behind; the CLI then
prints one line, not a traceback."""
import json
import subprocess
import sys
import textwrap

from full_disk import file_size_limit

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
