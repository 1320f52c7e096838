"""`train.parallel=fsdp` (FSDP2) on the CPU: 2 processes over gloo through torchrun.

One module-scoped set of runs serves every assertion (each torchrun launch costs several
seconds of start-up, so the independent ones run at the same time): a DDP run and an FSDP
run of the same STEPS steps, and copies of the FSDP run cut back to its checkpoint at STOP
(the state a run stopped there leaves) resumed to STEPS under FSDP and under DDP.

Tolerances:
- FSDP vs DDP losses, rtol 1e-5: the same arithmetic, except that FSDP averages gradients
  over ranks with reduce-scatters (one per backward through a unit: the student backbone
  can reduce twice per step) and DDP with bucketed all-reduces; the different summation and
  division order changes gradients by about an ulp, and AdamW's normalisation turns that into
  visible weight differences for parameters whose gradient is almost zero (attention key
  biases, which softmax ignores). Measured: relative loss differences up to 1.3e-7.
- FSDP resumed vs FSDP uninterrupted: exact. The checkpoint holds full tensors that every
  rank cuts into the same shards it had, plus the optimizer, RNG and loader states, and gloo
  collectives on the CPU are deterministic, so the resumed run does the identical arithmetic.
"""
import contextlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from tcore.checkpoint import load_checkpoint
from tcore.config import load_config
from tcore.distributed import DistInfo
from tcore.eval.checkpoint import load_eval_backbone
from tcore.fsdp import is_sharded
from tcore.models import load_reference
from tcore.train import Trainer, parallel_mode, read_losses

from processes import killed_at_the_end, run_two_ranks

STEPS, STOP = 4, 2
FAST = ["train.log_every=1", "model.head.prototypes=256", "data.batch_size_per_gpu=4",
        "data.num_threads=1"]
LOSS_RTOL = 1e-5


def torchrun(shards, out, parallel, max_steps, *extra):
    """A 2-process CPU run of the tiny preset; returns the CompletedProcess (checked)."""
    (done,) = finished(started(shards, out, parallel, max_steps, *extra))
    return done


def started(shards, out, parallel, max_steps, *extra) -> subprocess.Popen:
    """Start such a run (`--standalone`: a rendezvous port of its own, so runs can overlap)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "tcore.cli", "train", "--config", "tiny_cpu",
               "--data", str(shards), "--output", str(out), "--max-steps", str(max_steps),
               "--checkpoint-every", str(STOP), "--no-progress", *FAST,
               f"train.parallel={parallel}", *extra]
    # Files, not pipes: a run that is not being read yet must not block on a full pipe.
    logs = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    process = subprocess.Popen(command, stdout=logs[0], stderr=logs[1])
    process.logs = logs
    return process


def finished(*processes: subprocess.Popen) -> list[subprocess.CompletedProcess]:
    """Wait for every run (none outlives this call), then check each ended well."""
    with contextlib.ExitStack() as stack:
        for process in processes:
            stack.enter_context(killed_at_the_end(process))
        for process in processes:
            process.wait(timeout=300)
    done = []
    for process in processes:
        stdout, stderr = (_read(log) for log in process.logs)
        assert process.returncode == 0, stderr[-4000:]
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                stderr))
    return done


def _read(log) -> str:
    log.seek(0)
    text = log.read()
    log.close()
    return text


@pytest.fixture(scope="module")
def runs(synth_shards, tmp_path_factory):
    """Runs that do not depend on each other overlap: most of a launch is its processes
    importing and building, and each run's arithmetic is the same as alone (gloo on the CPU
    is deterministic)."""
    root = tmp_path_factory.mktemp("fsdp")
    finished(started(synth_shards, root / "ddp", "ddp", STEPS),
             started(synth_shards, root / "fsdp", "fsdp", STEPS))
    for name in ("resumed", "crossed"):     # as if stopped at STOP: its later checkpoint gone
        shutil.copytree(root / "fsdp", root / name)
        (root / name / "checkpoints" / f"checkpoint-{STEPS:08d}.pt").unlink()
    resumed, _ = finished(started(synth_shards, root / "resumed", "fsdp", STEPS, "--resume"),
                          started(synth_shards, root / "crossed", "ddp", STEPS, "--resume"))
    return {"root": root, "ddp": root / "ddp", "fsdp": root / "fsdp",
            "resumed": root / "resumed", "crossed": root / "crossed",
            "stdout": resumed.stdout}


def checkpoint(run_dir, step=STEPS):
    return load_checkpoint(run_dir / "checkpoints" / f"checkpoint-{step:08d}.pt")


def test_fsdp_losses_match_ddp(runs):
    ddp, fsdp = read_losses(runs["ddp"]), read_losses(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    for step in ddp:
        assert set(fsdp[step]) == set(ddp[step])
        for term, value in ddp[step].items():
            assert fsdp[step][term] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-7), (step, term)
    # The model changes over the run (a frozen one would match trivially).
    assert len({round(ddp[s]["total"], 5) for s in ddp}) == STEPS


def test_fsdp_resume_matches_uninterrupted_run(runs):
    assert "trained steps 3..4" in runs["stdout"]
    straight, resumed = read_losses(runs["fsdp"]), read_losses(runs["resumed"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(STOP + 1, STEPS + 1):
        assert resumed[step] == straight[step], step
    # ... and ends with the same weights and optimizer moments, bit for bit.
    a, b = checkpoint(runs["fsdp"]), checkpoint(runs["resumed"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def test_fsdp_checkpoint_resumes_under_ddp(runs):
    """The shared checkpoint layout lets an FSDP run continue under DDP (same world size):
    its steps after the stop match the FSDP run's within the DDP-vs-FSDP tolerance."""
    straight, crossed = read_losses(runs["fsdp"]), read_losses(runs["crossed"])
    assert sorted(crossed) == list(range(1, STEPS + 1))
    assert checkpoint(runs["crossed"])["parallel"] == "ddp"
    for step in range(STOP + 1, STEPS + 1):
        for term, value in straight[step].items():
            assert crossed[step][term] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-7), \
                (step, term)


def test_fsdp_checkpoint_has_the_ddp_layout(runs):
    ddp, fsdp = checkpoint(runs["ddp"]), checkpoint(runs["fsdp"])
    assert set(ddp) == set(fsdp)
    assert (ddp["parallel"], fsdp["parallel"]) == ("ddp", "fsdp")
    assert fsdp["world_size"] == 2 and fsdp["step"] == STEPS
    assert [s["shard_id"] for s in fsdp["loader"]] == [0, 1]
    assert [s["batches_seen"] for s in fsdp["loader"]] == [STEPS, STEPS]
    assert len(fsdp["rng"]) == 2
    # Full (unsharded) model tensors under the same names.
    assert list(ddp["model"]) == list(fsdp["model"])
    for key, value in ddp["model"].items():
        assert fsdp["model"][key].shape == value.shape, key
    # Optimizer: torch's own layout, the same parameter groups (names, multipliers,
    # schedules) and full-size moments per parameter id.
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert sorted(fsdp["optimizer"]["state"]) == sorted(ddp["optimizer"]["state"])
    for index, moments in ddp["optimizer"]["state"].items():
        for name, value in moments.items():
            assert fsdp["optimizer"]["state"][index][name].shape == value.shape, (index, name)


def test_fsdp_checkpoint_and_export_load_as_reference(runs):
    ddp = load_reference(runs["ddp"] / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    fsdp = load_reference(runs["fsdp"] / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    ddp_state, fsdp_state = ddp.backbone.state_dict(), fsdp.backbone.state_dict()
    assert list(ddp_state) == list(fsdp_state)
    for key, value in ddp_state.items():
        # The teacher moves by (1 - momentum) x the student's step: the ulp-level gradient
        # differences of the loss comparison stay far below 1e-6 here.
        torch.testing.assert_close(fsdp_state[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # teacher_backbone.safetensors: full shapes, the checkpoint's teacher exactly.
    exported = load_file(runs["fsdp"] / "teacher_backbone.safetensors")
    assert set(exported) == {f"backbone.{k}" for k in fsdp_state}
    for key, value in fsdp_state.items():
        assert torch.equal(exported[f"backbone.{key}"], value), key
    assert load_reference(runs["fsdp"] / "teacher_backbone.safetensors").source == "safetensors"
    # `tcore eval` reads the training checkpoint the same way.
    evaluated = load_eval_backbone(runs["fsdp"] / "checkpoints" / f"checkpoint-{STEPS:08d}.pt")
    assert torch.equal(evaluated.pos_embed, fsdp.backbone.pos_embed)


def test_fsdp_with_torch_compile_matches_eager(runs, synth_shards):
    # aot_eager captures the graphs around FSDP2's (eager) all-gather / reshard hooks;
    # inductor compiles the same graphs (checked by hand: 90 s cold on 2 cores).
    out = runs["root"] / "compiled"
    torchrun(synth_shards, out, "fsdp", STOP, "train.compile=true",
             "train.compile_backend=aot_eager")
    eager, compiled = read_losses(runs["fsdp"]), read_losses(out)
    assert sorted(compiled) == list(range(1, STOP + 1))
    for step in compiled:
        for term, value in eager[step].items():
            assert compiled[step][term] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-7)


def test_fsdp_at_world_size_1_is_a_single_process_run(capsys):
    cfg = load_config("tiny_cpu", ["model.head.prototypes=128", "train.parallel=fsdp"])
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, None, single)
    assert trainer.parallel == "single" and not is_sharded(trainer.model)
    assert trainer.loss_module.model is trainer.model
    assert capsys.readouterr().err.count("train.parallel=fsdp has no effect at world size 1") == 1
    assert parallel_mode(load_config("tiny_cpu", []), single) == "single"
    assert capsys.readouterr().err == ""  # ddp at world size 1: nothing to say


SHARDED_CHILD = r"""
import json, sys, torch
from torch.distributed.tensor import DTensor
from tcore.config import load_config
from tcore.distributed import init_distributed, shutdown
from tcore.fsdp import is_sharded
from tcore.train import Trainer
info = init_distributed("cpu")
cfg = load_config("tiny_cpu", ["model.head.prototypes=128", "train.parallel=fsdp"])
trainer = Trainer(cfg, None, info)
weight = trainer.model.student["backbone"].blocks[0].mlp.fc1.weight
optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
out = {"parallel": trainer.parallel, "sharded": is_sharded(trainer.model),
       "block_sharded": is_sharded(trainer.model.student["backbone"].blocks[0]),
       "dtensor": isinstance(weight, DTensor), "full_rows": weight.shape[0],
       "local_rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else None,
       "optimised_dtensors": sum(isinstance(p, DTensor) for p in optimised),
       "optimised": len(optimised)}
shutdown(info)
json.dump(out, open(sys.argv[1], "w"))
"""


def test_fsdp_at_two_ranks_shards_every_block_and_optimises_the_shards(tmp_path):
    """The runs above would also pass had `fsdp` quietly meant DDP (the losses, resume and
    checkpoint layout are the same by design): at world size 2 each block is an FSDP unit,
    its weights DTensors each rank holds half the rows of, and AdamW steps those."""
    for rank, got in enumerate(run_two_ranks(SHARDED_CHILD, tmp_path)):
        assert got["parallel"] == "fsdp" and got["sharded"] and got["block_sharded"], (rank, got)
        assert got["dtensor"] and got["local_rows"] * 2 == got["full_rows"], (rank, got)
        assert got["optimised_dtensors"] == got["optimised"] > 0, (rank, got)
