"""`tcore train` stopped from outside and resumed: kill -9, Ctrl-C, SIGTERM, a stop signal
to one rank or to torchrun, a run directory already in use, and two processes through
torchrun stopped and resumed. (Split from test_train.py so the two pytest workers share
the slow process tests.)"""
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

from tcore.checkpoint import list_checkpoints, load_checkpoint
from tcore.cli import main as cli
from tcore.config import load_config
from tcore.metrics_log import read_metrics
from tcore.schedules import build_schedules
from tcore.train import read_losses, train
from processes import children_of, free_port, killed_at_the_end, running
from train_runs import STEPS, FAST, DROP_PATH, train_command, torchrun_train

AHEAD = ["data.pipeline.assemble_ahead=1"]


def test_kill9_then_resume_matches_uninterrupted_run(synth_shards, tmp_path):
    """With batches made ahead in a thread of the loader (`assemble_ahead`), whose state
    must still be the one after the batch the step took (the SIGTERM test below resumes
    a run without it)."""
    # The uninterrupted reference run (in this process).
    cfg = load_config("tiny_cpu", FAST + DROP_PATH + AHEAD)
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
    proc = subprocess.Popen(train_command(synth_shards, killed_dir, *DROP_PATH, *AHEAD),
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


def test_two_process_gloo_run_through_torchrun_and_resume(synth_shards, tmp_path):
    """World size 2 on the CPU: DDP over gloo, the loader sharded by rank; a resume restores
    each rank's own loader and RNG state."""
    out = tmp_path / "ddp"
    done = torchrun_train(synth_shards, out, "--max-steps", "4")
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
    done = torchrun_train(synth_shards, resumed_dir, "--max-steps", "4", "--resume")
    assert done.stdout.count("trained steps 3..4") == 1, done.stdout[-2000:]
    losses = read_losses(resumed_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (3, 4):
        for term, value in reference[step].items():
            assert losses[step][term] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, term)
    # The resumed steps are not a repeat of earlier ones (a stale state would not show).
    assert reference[3]["total"] != pytest.approx(reference[2]["total"], rel=1e-6)
