"""`tcore train` end to end on real shards through the real DALI loader: kill -9 + --resume
gives the uninterrupted run's losses step for step; NaN stops the run; torch.compile gives
eager's losses; CLI errors name the problem."""
import copy
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf

from tcore.checkpoint import list_checkpoints, load_checkpoint
from tcore.cli import main as cli
from tcore.config import ConfigError, load_config
from tcore.distributed import init_distributed
from tcore.preprocess.shards import build_shards
from tcore.metrics_log import read_metrics
from tcore.optim import apply_schedules, build_optimizer
from tcore.schedules import build_schedules
from tcore.synthetic_batch import make_synthetic_batch
from tcore.train import Trainer, check_resumable_config, read_losses, resolve_precision, train
from full_disk import file_size_limit
from processes import children_of, free_port, killed_at_the_end, running

STEPS = 6
FAST = ["train.log_every=1", "model.head.prototypes=256", "data.batch_size_per_gpu=4"]
# The reference's stochastic depth: the resumed run must restore the RNG it draws from.
DROP_PATH = ["model.drop_path=0.1"]


def train_command(shards, out, *extra):
    return [sys.executable, "-m", "tcore.cli", "train", "--config", "tiny_cpu", "--data",
            str(shards), "--output", str(out), "--max-steps", str(STEPS),
            "--checkpoint-every", "2", "--no-progress", *FAST, *extra]


def test_kill9_then_resume_matches_uninterrupted_run(synth_shards, tmp_path):
    # The uninterrupted reference run (in this process).
    cfg = load_config("tiny_cpu", FAST + DROP_PATH)
    done = train(cfg, synth_shards, tmp_path / "straight", max_steps=STEPS, checkpoint_every=2,
                 progress=False)
    assert (done.start_step, done.end_step) == (0, STEPS)
    reference = read_losses(tmp_path / "straight")
    assert sorted(reference) == list(range(1, STEPS + 1))
    logged = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["samples_per_s"] > 0 for r in logged)
    # The first step waits for the loader's first batch (DALI builds and decodes it then).
    assert logged[0]["data_wait_fraction"] > 0.0

    # The same run in a subprocess, killed with SIGKILL right after its first checkpoint.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_command(synth_shards, killed_dir, *DROP_PATH),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed_dir / "checkpoints" / "checkpoint-00000002.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    steps_on_disk = [s for s, _ in list_checkpoints(killed_dir / "checkpoints")]
    assert steps_on_disk and max(steps_on_disk) < STEPS     # it really died mid-run

    # Resume (in this process) and finish.
    resumed = train(cfg, synth_shards, killed_dir, resume=True, max_steps=STEPS,
                    checkpoint_every=2, progress=False)
    assert resumed.start_step == max(steps_on_disk)
    losses = read_losses(killed_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for term, value in reference[step].items():
            assert losses[step][term] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, term)
    # Losses move over the run (the test would not notice a frozen model otherwise).
    assert len({round(reference[s]["total"], 5) for s in reference}) == STEPS

    state = load_checkpoint(resumed.last_checkpoint)
    assert state["step"] == STEPS
    assert {"model", "optimizer", "scaler", "loader", "rng", "config"} <= set(state)
    keys = state["model"].keys()
    for prefix in ("student.backbone.", "student.head.", "teacher.backbone.", "pmm."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"center_cls", "center_patch"} <= set(keys)
    assert state["loader"][0]["batches_seen"] == STEPS
    assert (killed_dir / "teacher_backbone.safetensors").stat().st_size > 0
    assert (killed_dir / "config.yaml").exists() and any((killed_dir / "tensorboard").iterdir())


def test_a_failed_checkpoint_write_names_the_file_and_the_one_kept(synth_shards, tmp_path):
    cfg = load_config("tiny_cpu", FAST)
    run = tmp_path / "run"
    train(cfg, synth_shards, run, max_steps=2, checkpoint_every=2, progress=False)
    kept = run / "checkpoints" / "checkpoint-00000002.pt"
    before = kept.read_bytes()
    limit = 200_000
    assert len(before) > 2 * limit   # the next checkpoint cannot be written whole

    # The resumed run fills its "disk" while writing step 4's checkpoint.
    command = [sys.executable, "-m", "tcore.cli", "train", "--config", "tiny_cpu", "--data",
               str(synth_shards), "--output", str(run), "--max-steps", "4", "--resume",
               "--checkpoint-every", "2", "--no-progress", *FAST]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(limit))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"Error: {run / 'checkpoints' / 'checkpoint-00000004.pt'}: cannot write: File too "
            f"large; {kept} is intact") in done.stderr
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert kept.read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [kept.name]  # no temporary
    assert sorted(read_losses(run)) == [1, 2, 3, 4]     # the steps it trained are still logged

    # A newest checkpoint damaged after it was written: the error says which one to use.
    (run / "checkpoints" / "checkpoint-00000004.pt").write_bytes(before[: len(before) // 2])
    result = CliRunner().invoke(cli, command[3:])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "checkpoint-00000004.pt: cannot read checkpoint" in result.output
    assert (f"to resume from checkpoint-00000002.pt instead, move checkpoint-00000004.pt out of "
            f"{run / 'checkpoints'}") in result.output


def test_ctrl_c_says_where_to_resume_and_ends_the_stage_a_process(synth_shards, tmp_path):
    run = tmp_path / "run"
    # As typed in a terminal: Python turns SIGINT into KeyboardInterrupt only where it was
    # not inherited ignored, which it is when the suite itself runs as a background job of a
    # shell without job control (`(make test &)`): the run then rightly ignored the Ctrl-C.
    as_in_a_terminal = ("import runpy, signal, sys; "
                        "signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'tcore'; runpy.run_module('tcore.cli', run_name='__main__')")
    command = [sys.executable, "-c", as_in_a_terminal, "train", "--config", "tiny_cpu", "--data",
               str(synth_shards), "--output", str(run), "--max-steps", "200",
               "--checkpoint-every", "2", "--no-progress", *FAST,
               "data.pipeline.producer=process"]
    with killed_at_the_end(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)) as proc:
        first = run / "checkpoints" / "checkpoint-00000002.pt"
        deadline = time.time() + 120
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        children = children_of(proc.pid)
        assert children, "the loader's stage A process should be running"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    said = re.search(r"tcore train: interrupted after step (\d+); newest checkpoint (\S+); "
                     r"continue with --resume", stderr)
    assert said, stderr[-3000:]
    newest = max(step for step, _ in list_checkpoints(run / "checkpoints"))
    assert said.group(2) == str(run / "checkpoints" / f"checkpoint-{newest:08d}.pt")
    assert newest <= int(said.group(1)) < 200
    time.sleep(0.5)
    assert not [c for c in children if running(c)]


HOLD_THE_LOCK = ("import sys, time; from tcore.train import run_directory_lock\n"
                 "with run_directory_lock(sys.argv[1]):\n"
                 "    print('holding', flush=True); time.sleep(300)")


def test_a_run_directory_in_use_is_refused_until_its_process_dies(synth_shards, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = CliRunner().invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                          str(run), "--max-steps", "1", *FAST])
        assert result.exit_code == 1, result.output
        assert (f"{run}: another tcore train (pid {holder.pid} on ") in result.output
        assert "is training into this run directory" in result.output
        assert sorted(p.name for p in run.iterdir()) == [".lock"]     # nothing else touched
    finally:
        holder.kill()
        holder.wait()
    # Killed, the holder's lock is gone with it: the run starts.
    done = train(load_config("tiny_cpu", FAST), synth_shards, run, max_steps=1, progress=False)
    assert done.end_step == 1


def _wait_for_logged_steps(run: Path, proc, steps: int) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} logged steps: {proc.communicate()[1][-3000:]}")


def test_sigterm_checkpoints_at_the_next_log_step_and_the_resume_matches(synth_shards,
                                                                          tmp_path):
    """As a scheduler ends a job: SIGTERM to every process of it (the stage A process too).
    The run writes a checkpoint at its next log step (checkpoint_every is 100) and exits 143,
    repeats during the run and while it ends included; resumed from there it gives the
    uninterrupted run's losses."""
    run = tmp_path / "run"
    # 8 steps to the next log step: more than stage A and the loader hold queued, so a stage
    # A process that died of the signal would be noticed before the checkpoint.
    settings = [*FAST, *DROP_PATH, "train.log_every=8", "data.pipeline.producer=process"]
    command = [sys.executable, "-m", "tcore.cli", "train", "--config", "tiny_cpu", "--data",
               str(synth_shards), "--output", str(run), "--max-steps", "200",
               "--checkpoint-every", "100", "--no-progress", *settings]
    with killed_at_the_end(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)) as proc:
        _wait_for_logged_steps(run, proc, 8)
        for pid in [proc.pid, *children_of(proc.pid)]:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)    # a repeat (torchrun forwards the job's SIGTERM)
        stderr = ""
        for line in proc.stderr:    # another repeat as the run says it stopped, while it ends
            stderr += line
            if "stopped by" in line:
                proc.send_signal(signal.SIGTERM)
                break
        stderr += proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    said = re.search(r"tcore train: stopped by SIGTERM after step (\d+); checkpoint (\S+); "
                     r"continue with --resume", stderr)
    assert said, stderr[-3000:]
    stopped = int(said.group(1))
    assert stopped % 8 == 0 and 8 <= stopped < 100
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [stopped]
    assert said.group(2) == str(run / "checkpoints" / f"checkpoint-{stopped:08d}.pt")

    cfg = load_config("tiny_cpu", settings)
    resumed = train(cfg, synth_shards, run, resume=True, max_steps=stopped + 2,
                    checkpoint_every=100, progress=False)
    assert resumed.start_step == stopped and resumed.stopped_by is None
    straight = train(cfg, synth_shards, tmp_path / "straight", max_steps=stopped + 2,
                     checkpoint_every=100, progress=False)
    reference, losses = read_losses(straight.run_dir), read_losses(run)
    assert sorted(losses) == sorted(reference) == list(range(1, stopped + 3))
    for step in reference:
        for term, value in reference[step].items():
            assert losses[step][term] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, term)


@pytest.mark.parametrize("told", ["rank 1 alone", "torchrun", "torchrun told to forward"])
def test_a_stop_signal_stops_both_ranks_at_the_same_step(synth_shards, tmp_path, told):
    """SIGUSR1 to rank 1 alone (rank 0 must stop too); SIGTERM to torchrun, which forwards
    it to its workers (what `scancel` or a time limit does to a torchrun job step); SIGUSR1
    to a torchrun started with SIGUSR1 among its --signals-to-handle (README)."""
    out = tmp_path / "ddp"
    forward = (["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
               if told == "torchrun told to forward" else [])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *forward,
               "--master-port", str(free_port()), "-m", "tcore.cli", "train", "--config",
               "tiny_cpu", "--data", str(synth_shards), "--output", str(out), "--max-steps", "200",
               "--checkpoint-every", "100", "--no-progress", *FAST, "train.log_every=2",
               "data.num_threads=1"]
    with killed_at_the_end(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)) as proc:
        _wait_for_logged_steps(out, proc, 2)
        if told.startswith("torchrun"):
            name = "SIGTERM" if told == "torchrun" else "SIGUSR1"
            proc.send_signal(getattr(signal, name))
        else:
            name = "SIGUSR1"
            rank_1 = [pid for pid in children_of(proc.pid)
                      if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
            assert len(rank_1) == 1
            os.kill(rank_1[0], signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    said = re.search(rf"stopped by {name} after step (\d+)", stderr)
    assert said, stderr[-3000:]
    stopped = int(said.group(1))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [stopped]
    state = load_checkpoint(out / "checkpoints" / f"checkpoint-{stopped:08d}.pt")
    assert [s["batches_seen"] for s in state["loader"]] == [stopped, stopped]


def test_nan_loss_stops_with_step_and_term(synth_shards, tmp_path):
    # lr 0 at step 1 (warm-up start), then an absurd lr: the weights overflow and the next
    # forward is NaN/inf. The run must stop there, naming the step and the loss term, with
    # exit status 3. Checkpoints come every step but logs rarely: the losses are checked at
    # every checkpoint step all the same, so no checkpoint of NaN weights is written.
    result = CliRunner().invoke(cli, ["train", "--config", "tiny_cpu", "--data",
                                      str(synth_shards), "--output", str(tmp_path / "nan"),
                                      "--max-steps", str(STEPS), "--checkpoint-every", "1",
                                      "--no-progress", *FAST, "train.log_every=1000",
                                      "optim.base_lr=1e30", "optim.scaling_rule=none"])
    assert result.exit_code == 3, result.output
    found = re.search(r"non-finite loss at step (\d+): (\w+) = (\S+); ", result.output)
    assert found, result.output
    step, term, value = int(found[1]), found[2], float(found[3])
    assert 2 <= step <= STEPS and not math.isfinite(value)
    assert term in ("dino", "koleo", "patch_past", "patch_future", "past_future", "total")
    # Only checkpoints from before the bad step exist, and they hold finite weights.
    saved = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert saved and all(s < step for s, _ in saved)
    assert f"last good checkpoint: {saved[-1][1]}" in result.output
    logged = read_losses(tmp_path / "nan")                   # finite steps before it are logged
    assert sorted(logged) == list(range(1, step))
    weights = load_checkpoint(saved[-1][1])["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _small_batch(seed):
    return make_synthetic_batch(4, n_local=2, global_size=32, local_size=16, seed=seed)


def _three_steps(cfg):
    """Three steps on batches whose masked-token counts differ (3, 2, 3), as in training."""
    torch.manual_seed(0)
    trainer = Trainer(cfg, None, init_distributed("cpu"))
    batches = [_small_batch(seed) for seed in (0, 1, 0)]
    assert [b["mask_indices"].numel() for b in batches] == [3, 2, 3]
    return [{k: v.item() for k, v in trainer.step(i, b)[0].items()}
            for i, b in enumerate(batches)]


# aot_eager checks graph capture alone; inductor generates and compiles C++ (the path
# `train.compile=true` takes): about 60 s cold on 2 quiet cores.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_matches_eager(backend):
    base = ["model.head.prototypes=128", "optim.warmup_epochs=0"]
    eager = _three_steps(load_config("tiny_cpu", base))
    compiled = _three_steps(load_config("tiny_cpu", base + ["train.compile=true",
                                                            f"train.compile_backend={backend}"]))
    assert eager[0]["total"] != eager[2]["total"]
    for e, c in zip(eager, compiled):
        for term in e:
            assert c[term] == pytest.approx(e[term], rel=1e-5, abs=1e-6), term


def test_compiled_step_compiles_once_for_every_masked_token_count():
    # The mask ladder gives each batch its own count of masked tokens; left to discover
    # that, torch.compile compiles the step twice (the second time with the count symbolic).
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch.manual_seed(0)
    trainer = Trainer(load_config("tiny_cpu", ["model.head.prototypes=128"]), None,
                      init_distributed("cpu"))
    trainer.forward = torch.compile(trainer.loss_module, backend=counting_backend)
    counts = set()
    for i, seed in enumerate((0, 1, 2, 5)):
        batch = _small_batch(seed)
        counts.add(batch["mask_indices"].numel())
        trainer.step(i, batch)
    assert len(counts) >= 2 and min(counts) >= 2     # 0 and 1 are always specialised
    assert len(graphs) == 1


def _traced_shapes(graph) -> dict[str, tuple]:
    """Each tensor input of a graph dynamo traced, by its name there: its traced shape."""
    return {node.name: tuple(node.meta["example_value"].shape)
            for node in graph.graph.nodes
            if node.op == "placeholder" and torch.is_tensor(node.meta.get("example_value"))}


def _is_static(shape: tuple) -> bool:
    return all(isinstance(size, int) for size in shape)


def test_compiled_step_keeps_crop_sizes_static_when_a_compiled_function_made_the_crops():
    # The loader's colour stage is compiled with dynamic shapes, and torch marks what a
    # compiled function returns as dynamic in every dimension. Handed on as they were, such
    # crops made the step trace with symbolic image sizes (kernels for unknown sizes; with
    # torch 2.11 on an H200, an Inductor AssertionError). Only the masked-token count may be
    # symbolic.
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    produced = torch.compile(lambda crops: crops + 0, dynamic=True, backend="aot_eager")
    batch = {name: produced(value) if name.endswith("_crops") else value
             for name, value in _small_batch(0).items()}
    # The hazard is real in this torch: a compiled function given these crops directly
    # traces them with symbolic sizes.
    torch.compile(lambda crops: crops * 2, backend=recording_backend)(batch["global_crops"])
    assert not _is_static(next(iter(_traced_shapes(graphs.pop()).values())))

    torch.manual_seed(0)
    trainer = Trainer(load_config("tiny_cpu", ["model.head.prototypes=128"]), None,
                      init_distributed("cpu"))
    trainer.forward = torch.compile(trainer.loss_module, backend=recording_backend)
    trainer.step(0, batch)
    assert len(graphs) == 1
    shapes = _traced_shapes(graphs[0])
    crops = {name: shape for name, shape in shapes.items() if name.endswith("_crops_")}
    assert len(crops) == 4 and all(_is_static(shape) for shape in crops.values()), crops
    masked = [shape for name, shape in shapes.items() if "mask_indices" in name]
    assert len(masked) == 1 and not _is_static(masked[0])
    # Parameters and the rest of the batch keep their sizes too.
    assert sum(not _is_static(shape) for shape in shapes.values()) <= 2   # mask indices, weights


def test_resume_in_another_precision_is_refused_and_stale_export_removed(synth_shards, tmp_path):
    cfg = load_config("tiny_cpu", FAST + ["train.precision=fp32"])
    given = copy.deepcopy(cfg)
    run = tmp_path / "run"
    first = train(cfg, synth_shards, run, max_steps=2, checkpoint_every=2, progress=False)
    assert cfg == given                                 # the caller's config is left as it was
    assert not list(run.glob(".*.tmp-*"))
    # The export is the EMA teacher's backbone of the last checkpoint (not the student's).
    from safetensors.torch import load_file
    model = load_checkpoint(first.last_checkpoint)["model"]
    exported = load_file(first.teacher_export)
    assert first.teacher_export == run / "teacher_backbone.safetensors"
    assert exported and all(torch.equal(v, model[f"teacher.{k}"])
                            for k, v in exported.items())
    assert not all(torch.equal(v, model[f"student.{k}"]) for k, v in exported.items())
    # What a run killed after step 3 was logged leaves: a record the resumed run redoes, and
    # a line cut short.
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "loss/total": 123.0}\n{"step": 4, "loss/to')
    # What a crash mid-export (or mid-config) leaves.
    stales = [run / ".teacher_backbone.safetensors.tmp-x1y2", run / ".config.yaml.tmp-x3y4"]
    for stale in stales:
        stale.write_bytes(b"partial")
    other = load_config("tiny_cpu", FAST + ["train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"trained in fp32.*computes in bf16"):
        train(other, synth_shards, run, resume=True, max_steps=4, checkpoint_every=2,
              progress=False)
    assert not any(stale.exists() for stale in stales)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]   # nothing lost
    done = train(cfg, synth_shards, run, resume=True, max_steps=4, checkpoint_every=2,
                 progress=False)
    assert (done.start_step, done.end_step) == (2, 4)
    logged = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[2]["loss/total"] != 123.0


def test_resume_names_a_changed_key_and_refuses_other_shards(synth_root, synth_shards,
                                                              tmp_path, capsys):
    cfg = load_config("tiny_cpu", FAST)
    run = tmp_path / "run"
    first = train(cfg, synth_shards, run, resume=True, max_steps=2, checkpoint_every=2,
                  progress=False)
    assert first.start_step == 0 and "no checkpoint in" in capsys.readouterr().err
    changed = load_config("tiny_cpu", FAST[:2] + ["data.batch_size_per_gpu=2"])
    with pytest.raises(ConfigError, match=r"data\.batch_size_per_gpu: 4 -> 2"):
        train(changed, synth_shards, run, resume=True, max_steps=4, progress=False)
    # The run directory keeps the run's config, not the refused one.
    assert OmegaConf.load(run / "config.yaml").data.batch_size_per_gpu == 4
    # The same videos sharded differently are other shards: the reader's position in them
    # would mean other samples.
    other = tmp_path / "other"
    build_shards(synth_root / "train", other, frames=20, short_side=128, codec="vp9",
                 samples_per_shard=4, workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"checkpoint-00000002\.pt: loader state was saved "
                                          r"over other shards than .*other") as info:
        train(cfg, other, run, resume=True, max_steps=4, progress=False)
    # ... naming where the run's own shards were, which the user may have forgotten.
    assert str(info.value).endswith(f"(the run was trained on {synth_shards.resolve()})")
    # Moved shards are the same shards.
    moved = tmp_path / "moved"
    shutil.copytree(synth_shards, moved)
    done = train(cfg, moved, run, resume=True, max_steps=4, checkpoint_every=2, progress=False)
    assert (done.start_step, done.end_step) == (2, 4)
    # A checkpoint of the earlier layout (cls position folded into cls_token) is refused.
    path = list_checkpoints(run / "checkpoints")[-1][1]
    state = load_checkpoint(path)
    for name in [n for n in state["model"] if n.endswith("cls_pos_embed")]:
        state["model"][name[:-len("cls_pos_embed")] + "cls_token"] += state["model"].pop(name)
    torch.save(state, path)
    with pytest.raises(ConfigError, match="written by an earlier tcore.*cannot resume"):
        train(cfg, synth_shards, run, resume=True, max_steps=6, progress=False)


def test_cli_says_when_the_schedule_ends_before_max_steps(synth_shards, tmp_path):
    args = ["train", "--data", str(synth_shards), "--output", str(tmp_path / "run"),
            "--max-steps", "6", "--no-progress", *FAST, "optim.official_epoch_length=2",
            "optim.epochs=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained steps 1..4" in result.output
    assert "the schedule ends at step 4" in result.output and "--max-steps 6" in result.output
    export = tmp_path / "run" / "teacher_backbone.safetensors"
    export.unlink()                           # nothing left to train: the export is written
    again = CliRunner().invoke(cli, args + ["--resume"])
    assert again.exit_code == 0 and "is at step 4 already" in again.output
    assert export.stat().st_size > 0


def test_cli_errors_name_the_problem(synth_shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--data", str(tmp_path / "nowhere"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code != 0 and "nowhere: no such file or directory" in result.output
    result = runner.invoke(cli, ["train", "--data", str(tmp_path), "--output",
                                 str(tmp_path / "run")])
    assert result.exit_code != 0 and "no manifest.json there" in result.output
    if not torch.cuda.is_available():   # a paper preset (fp16) on the CPU says what to set
        result = runner.invoke(cli, ["train", "--config", "vits16_k400", "--data",
                                     str(synth_shards), "--output", str(tmp_path / "paper")])
        assert result.exit_code != 0 and "add train.precision=fp32" in result.output
        assert not (tmp_path / "paper").exists()
    result = runner.invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                 str(tmp_path / "run"), "optim.epohcs=3"])
    assert result.exit_code != 0 and "optim.epohcs" in result.output
    result = runner.invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                 str(tmp_path / "run"), "model.head.protos=8"])
    assert result.exit_code != 0
    assert "override 'model.head.protos=8': unknown key model.head.protos" in result.output
    result = runner.invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                 str(tmp_path / "run"), "model.arch=vit_smal"])
    assert result.exit_code == 1 and "override 'model.arch=vit_smal': model.arch must be" in \
        result.output
    # None of these failed starts left a run directory behind.
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "existing" / "checkpoints"
    existing.mkdir(parents=True)
    (existing / "checkpoint-00000002.pt").write_bytes(b"x")
    result = runner.invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                 str(tmp_path / "existing"), "--max-steps", "1", *FAST])
    assert result.exit_code != 0 and "already holds checkpoints; pass --resume" in result.output
    assert (existing / "checkpoint-00000002.pt").read_bytes() == b"x"      # nothing trained


def torchrun_train(shards, out, port, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(port), "-m", "tcore.cli", "train", "--config", "tiny_cpu",
               "--data", str(shards), "--output", str(out), "--checkpoint-every", "2",
               "--no-progress", *FAST, *DROP_PATH, "data.num_threads=1", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_gloo_run_through_torchrun_and_resume(synth_shards, tmp_path):
    """World size 2 on the CPU: DDP over gloo, the loader sharded by rank; a resume restores
    each rank's own loader and RNG state."""
    out = tmp_path / "ddp"
    done = torchrun_train(synth_shards, out, 29517, "--max-steps", "4")
    assert done.stdout.count("trained steps 1..4") == 1          # rank 0 reports, alone
    state = load_checkpoint(out / "checkpoints" / "checkpoint-00000002.pt")
    assert state["world_size"] == 2
    assert [s["shard_id"] for s in state["loader"]] == [0, 1]
    assert [s["batches_seen"] for s in state["loader"]] == [2, 2]
    # Each rank seeds its own torch generator (train.seed + rank): stochastic depth and any
    # other draw differ between ranks.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # Rank 0 alone writes the logs: one record per step, one TensorBoard event file.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").iterdir())) == 1
    # lr is scaled by the global batch, 2 x 4 (METHOD.md section 6); step 2 logs it=1's values.
    cfg = load_config("tiny_cpu", FAST + ["data.num_threads=1"])
    logged = read_metrics(out / "metrics.jsonl")[1]
    assert logged["step"] == 2
    assert logged["sched/lr"] == pytest.approx(build_schedules(cfg.optim, 8).at(1)["lr"], rel=1e-9)
    assert logged["sched/lr"] != pytest.approx(build_schedules(cfg.optim, 4).at(1)["lr"])

    # Resume from step 2's checkpoint. The logged losses are means over the ranks, so they
    # match the uninterrupted run's only if each rank gets back its own shard position and
    # its own stochastic-depth RNG (rank 1 given rank 0's state would see other batches).
    reference = read_losses(out)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    (resumed_dir / "checkpoints" / "checkpoint-00000004.pt").unlink()
    done = torchrun_train(synth_shards, resumed_dir, 29518, "--max-steps", "4", "--resume")
    assert done.stdout.count("trained steps 3..4") == 1, done.stdout[-2000:]
    losses = read_losses(resumed_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (3, 4):
        for term, value in reference[step].items():
            assert losses[step][term] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, term)
    # The resumed steps are not a repeat of earlier ones (a stale state would not show).
    assert reference[3]["total"] != pytest.approx(reference[2]["total"], rel=1e-6)


def test_step_is_schedules_loss_clip_adamw_then_ema():
    """Three Trainer steps against the same steps written out with torch's own pieces
    (METHOD.md sections 5 and 6): the loss at the schedule's teacher temperature, gradients
    cleared, clipped per module (backbone, head, PMM) before AdamW, then the teacher EMA at
    the schedule's momentum of the updated student. Short schedules (4 steps) make the
    temperature warm-up and the momentum ramp move at every step."""
    cfg = load_config("tiny_cpu", ["model.head.prototypes=128", "optim.warmup_epochs=0",
                                   "optim.official_epoch_length=4", "optim.epochs=1",
                                   "optim.freeze_last_layer_epochs=0",
                                   "optim.warmup_teacher_temp=0.03", "optim.teacher_temp=0.07",
                                   "optim.momentum_teacher=0.5", "optim.clip_grad=0.05"])
    torch.manual_seed(0)
    trainer = Trainer(cfg, None, init_distributed("cpu"))
    model = copy.deepcopy(trainer.model)
    optimizer = build_optimizer(model, cfg.optim)
    parts = (model.student["backbone"], model.student["head"], model.pmm)
    temps, momenta, clipped = [], [], []
    for it, seed in enumerate((0, 1, 2)):
        batch = _small_batch(seed)
        values = trainer.schedules.at(it)
        temps.append(values["teacher_temp"])
        momenta.append(values["momentum"])
        apply_schedules(optimizer, trainer.schedules, it)
        optimizer.zero_grad(set_to_none=True)
        expected = model.forward_losses(batch, values["teacher_temp"])
        expected["total"].backward()
        norms = [torch.nn.utils.clip_grad_norm_(part.parameters(), 0.05) for part in parts]
        clipped.append(min(float(n) for n in norms) > 0.05)
        optimizer.step()
        with torch.no_grad():
            for teacher, student in zip(model.teacher.parameters(), model.student.parameters()):
                teacher.mul_(values["momentum"]).add_(student, alpha=1.0 - values["momentum"])

        got, _ = trainer.step(it, batch)
        for term, value in expected.items():
            assert float(got[term].detach()) == pytest.approx(float(value.detach()), rel=1e-6,
                                                          abs=1e-8), (it, term)
        mine, theirs = trainer.model.state_dict(), model.state_dict()
        for name, value in theirs.items():
            assert torch.allclose(mine[name], value, rtol=1e-6, atol=1e-9), (it, name)
    assert len(set(temps)) == 3 and len(set(momenta)) == 3      # both schedules move
    assert all(clipped)                                         # clipping is active


def test_resume_refuses_changed_model_loss_data_optim_but_not_train():
    """METHOD.md section 6: the schedules, losses, data and model of a run are its recipe; only
    `train` (logging, checkpoint interval, ...) may change on resumption."""
    cfg = load_config("tiny_cpu", ["model.head.prototypes=128"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    source = Path("checkpoint-00000002.pt")
    for override, named in (("optim.base_lr=0.001", "optim.base_lr: 0.016 -> 0.001"),
                            ("model.drop_path=0.1", "model.drop_path: 0.0 -> 0.1"),
                            ("loss.koleo_weight=0.2", "loss.koleo_weight: '<unset>' -> 0.2"),
                            ("data.num_threads=1", "data.num_threads: 2 -> 1")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128",
                                                            override]), saved, source)
    check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128",
                                                    "train.log_every=1", "train.keep_last=5",
                                                    "train.checkpoint_every=7"]), saved, source)
    many = [f"optim.{k}=0.5" for k in ("base_lr", "min_lr", "weight_decay", "layer_decay",
                                       "patch_embed_lr_mult", "pmm_lr_mult", "clip_grad")]
    with pytest.raises(ConfigError, match=r"optim\.base_lr: .*; and 2 more\); resume") as info:
        check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128"] + many),
                               saved, source)
    assert str(info.value).count(" -> 0.5") == 5               # the first five are listed


def test_checkpoint_checks_before_loading_world_size_precision_layout():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    torch.manual_seed(0)
    trainer = Trainer(load_config("tiny_cpu", ["model.head.prototypes=128"]), None,
                      init_distributed("cpu"))
    source = Path("checkpoint-00000002.pt")
    with pytest.raises(ConfigError, match="written by 2 processes, resuming with 1; .*"
                       "start it with 2 in all$"):
        trainer.load_state_dict({"world_size": 2, "precision": "fp32"}, source)
    # Checkpoints from before the precision was saved: a gradient scaler's state means fp16.
    fp16_scaler = torch.amp.GradScaler("cpu", enabled=True).state_dict()
    with pytest.raises(ConfigError, match="trained in fp16, but this run computes in fp32"):
        trainer.load_state_dict({"world_size": 1, "scaler": fp16_scaler}, source)
    # Without one it was bf16 or fp32, which an fp32 run continues: the next check (the
    # backbone layout) is what refuses this one.
    old_layout = {"student.backbone.cls_token": torch.zeros(1, 1, 192)}
    with pytest.raises(ConfigError, match="written by an earlier tcore"):
        trainer.load_state_dict({"world_size": 1, "scaler": {}, "model": old_layout}, source)
