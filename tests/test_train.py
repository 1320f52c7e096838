"""`tcore train` end to end on real shards through the real DALI loader: a failed checkpoint
write keeps the last good one; NaN stops the run; torch.compile gives eager's losses; a
resume refuses what would not continue the run; CLI errors name the problem. Runs stopped
from outside and resumed (kill -9, signals, torchrun) are in test_train_interrupts.py."""
import copy
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from click.testing import CliRunner
from omegaconf import OmegaConf

from tcore.checkpoint import list_checkpoints, load_checkpoint
from tcore.cli import main as cli
from tcore.config import ConfigError, load_config
from tcore.distributed import init_distributed
from tcore.preprocess.shards import build_shards
from tcore.metrics_log import read_metrics
from tcore.optim import apply_schedules, build_optimizer
from tcore.pipelines.manifest import load_shard_set
from tcore.synthetic_batch import make_synthetic_batch
from tcore.train import Trainer, check_resumable_config, read_losses, resolve_precision, train
from full_disk import file_size_limit
from train_runs import STEPS, FAST


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


def test_compiled_step_matches_eager():
    """The path `train.compile=true` takes: dynamo's capture, AOT autograd and Inductor's
    lowering, fusion and code (Triton on a GPU, C++ here). The C++ is scalar (66 kernels):
    the test then took 53 s alone with Inductor's cache cold on 2 cores, against 107 s with
    SIMD intrinsics (docs/PERFORMANCE.md, "The test suite"), and a GPU's kernels are not the
    CPU's SIMD code anyway. (Capture alone, `aot_eager`, is the FSDP
    file's compiled run.)"""
    base = ["model.head.prototypes=128", "optim.warmup_epochs=0"]
    eager = _three_steps(load_config("tiny_cpu", base))
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        compiled = _three_steps(load_config("tiny_cpu", base + ["train.compile=true"]))
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
    run.mkdir()     # an earlier start that logged 3 steps and ended before a checkpoint
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {n}}}\n' for n in (1, 2, 3)))
    first = train(cfg, synth_shards, run, resume=True, max_steps=2, checkpoint_every=2,
                  progress=False)
    assert first.start_step == 0
    assert (f"tcore train: --resume: no checkpoint in {run / 'checkpoints'}; starting at step 1 "
            f"in {run} (the 3 steps metrics.jsonl holds, and TensorBoard's, are replaced)"
            in capsys.readouterr().err)
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
    # The plan, as the run starts: tiny_cpu's lr 0.016 scaled by sqrt(4 / 1024)
    assert (f"tcore train: starting at step 1 in {tmp_path / 'run'}, stopping at step 4, where "
            "the schedule ends (before --max-steps 6)\n") in result.output
    assert "4 per process x 1 = global batch 4" in result.output
    assert "2 epochs x 2 steps = 4 steps = 16 samples drawn" in result.output
    assert "lr        0.016 x sqrt(4 / 1024) = 0.001, reached after 2 warm-up steps" in \
           result.output
    assert "the schedule ends at step 4" in result.output and "--max-steps 6" in result.output
    export = tmp_path / "run" / "teacher_backbone.safetensors"
    export.unlink()                           # nothing left to train: the export is written
    # The dry run of a resume says what the run would: nothing to train here, and a
    # changed override refused as the run refuses it (from RUN_DIR/config.yaml)
    planned = CliRunner().invoke(cli, args + ["--resume", "--dry-run"])
    assert planned.exit_code == 0 and planned.output.startswith(
        f"tcore train --dry-run: nothing to train: {tmp_path / 'run'} is at step 4 already; "
        "nothing written"), planned.output
    changed = CliRunner().invoke(cli, args + ["--resume", "--dry-run", "optim.base_lr=0.01"])
    assert changed.exit_code == 1 and "optim.base_lr: 0.016 -> 0.01" in changed.output
    again = CliRunner().invoke(cli, args + ["--resume"])
    assert again.exit_code == 0 and "is at step 4 already" in again.output
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000004.pt"
    assert f"tcore train: resuming after step 4 ({checkpoint})" in again.output
    assert export.stat().st_size > 0
    # Resumed with --max-steps below where the run is: it stays at step 4 and says so (it
    # said "at step 2" before), its checkpoints and logs as they were.
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    fewer = [*args[:5], "--max-steps", "2", *args[7:], "--resume"]
    third = CliRunner().invoke(cli, fewer)
    assert third.exit_code == 0, third.output
    assert third.output.endswith(f"nothing to train: {tmp_path / 'run'} is at step 4 already, "
                                 "past --max-steps 2\n"), third.output
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 4
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == logged
    # At exactly that step: said so (README's "at or below" read "past" for both).
    same = CliRunner().invoke(cli, [*args[:5], "--max-steps", "4", *args[7:], "--resume"])
    assert same.output.endswith(f"is at step 4 already, at --max-steps 4\n"), same.output


def test_dry_run_prints_the_plan_and_writes_nothing(synth_shards, tmp_path, monkeypatch):
    """A paper preset planned for 4 GPUs on a machine without one: the global batch, steps,
    passes and the scaled lr (0.002 x sqrt(256 / 1024), METHOD.md section 6), nothing made."""
    out = tmp_path / "run"
    args = ["train", "--config", "vits16_k400", "--data", str(synth_shards), "--output", str(out),
            "--dry-run"]
    result = CliRunner().invoke(cli, [*args, "--world-size", "4"])
    assert result.exit_code == 0, result.output
    shard_set = load_shard_set([str(synth_shards)])
    samples = shard_set.total_samples
    assert result.output.splitlines()[0] == \
        f"tcore train --dry-run: starting at step 1 in {out}; nothing written"
    assert "vit_small, fp16 on train.device=auto, 4 processes (DDP)" in result.output
    assert (f"{samples} video samples in {len(shard_set.tars)} shards; 64 per process x 4 = "
            "global batch 256") in result.output
    assert (f"400 epochs x 936 steps = 374,400 steps = 95,846,400 samples drawn, "
            f"{374_400 * 256 / samples:,.0f} passes over the data") in result.output
    assert "0.002 x sqrt(256 / 1024) = 0.001, reached after 18,720 warm-up steps, then cosine " \
           "to 1e-06 (PMM: 0.0001)" in result.output
    assert "teacher temperature 0.04 -> 0.07 over 28,080 steps\n" in result.output
    short = CliRunner().invoke(cli, [*args, "optim.epochs=10", "optim.warmup_epochs=1"]).output
    ends = 0.04 + 0.03 * (10 * 936 - 1) / (30 * 936 - 1)     # the warm-up's value at the end
    assert (f"over 28,080 steps, longer than the run: it ends at {ends:.4g}\n") in short, short
    assert "this run" not in result.output             # the whole schedule
    part = CliRunner().invoke(cli, [*args, "--world-size", "2", "--max-steps", "500"]).output
    lr = 0.002 * math.sqrt(128 / 1024) * 499 / (20 * 936 - 1)    # warming up at step 500
    assert (f"this run  steps 1..500 of 374,400: 64,000 samples drawn, {64_000 / samples:,.0f} "
            f"passes over the data; lr {lr:.4g} at its last step") in part, part
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")      # as torchrun sets it
    assert "64 per process x 2 = global batch 128" in CliRunner().invoke(cli, args).output
    monkeypatch.setenv("WORLD_SIZE", "two")
    wrong = CliRunner().invoke(cli, args)
    assert wrong.exit_code == 1 and "WORLD_SIZE='two' in the environment" in wrong.output
    monkeypatch.delenv("WORLD_SIZE")
    # METHOD.md's stated per-group factors, where set, are named beside the lr
    stated = CliRunner().invoke(cli, [*args, "optim.layer_decay=0.9",
                                      "optim.patch_embed_lr_mult=0.2",
                                      "optim.freeze_last_layer_epochs=1"]).output
    assert "(PMM: 5e-05; layer decay 0.9, patch embedding x0.2, last layer frozen 1 epoch(s))" \
        in stated, stated
    # An existing run: refused without --resume as the run would be; with it, where it goes on
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint-00000002.pt").write_bytes(b"x")
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "already holds checkpoints; pass --resume" in refused.output
    resumed = CliRunner().invoke(cli, [*args, "--resume", "--max-steps", "10"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.splitlines()[0] == (
        f"tcore train --dry-run: resuming after step 2 ({checkpoints / 'checkpoint-00000002.pt'}), "
        "stopping at --max-steps 10; nothing written")
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoint-00000002.pt", "checkpoints"]
    alone = CliRunner().invoke(cli, [*args[:-1], "--world-size", "4"])
    assert alone.exit_code == 2 and "give it with --dry-run" in alone.output
    # A real run where WORLD_SIZE is set but no rendezvous (a scheduler's variable, no
    # torchrun): one line, no run directory (torch's own error was a traceback)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    real = CliRunner().invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                    str(tmp_path / "real"), "--max-steps", "1", *FAST])
    assert real.exit_code == 1 and "WORLD_SIZE=2 but no MASTER_ADDR or MASTER_PORT in the " \
        "environment: launch with torchrun" in real.output, real.output
    assert not (tmp_path / "real").exists()


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


def test_resume_refuses_changed_model_loss_data_optim_but_not_train_save_its_seed():
    """METHOD.md section 6: the schedules, losses, data and model of a run are its recipe; only
    `train` (logging, checkpoint interval, ...) may change on resumption, and the loader's
    speed settings, which give the same batches (tests/test_pipeline_loader.py,
    test_pipeline_producer.py, test_pipeline_ahead.py). Not `train.seed`: it draws the
    loader's order and the ranks' random numbers (the loader refused it, without naming the
    key)."""
    cfg = load_config("tiny_cpu", ["model.head.prototypes=128"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    source = Path("checkpoint-00000002.pt")
    for override, named in (("optim.base_lr=0.001", "optim.base_lr: 0.016 -> 0.001"),
                            ("model.drop_path=0.1", "model.drop_path: 0.0 -> 0.1"),
                            ("loss.koleo_weight=0.2", "loss.koleo_weight: '<unset>' -> 0.2"),
                            ("data.batch_size_per_gpu=8", "data.batch_size_per_gpu: 16 -> 8"),
                            ("data.pipeline.shuffle_buffer=8",
                             "data.pipeline.shuffle_buffer: 16 -> 8"),
                            ("train.seed=5", "train.seed: 0 -> 5")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128",
                                                            override]), saved, source)
    check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128",
                                                    "train.log_every=1", "train.keep_last=5",
                                                    "train.checkpoint_every=7"]), saved, source)
    speed = ["data.num_threads=1", "data.pipeline.prefetch=4", "data.pipeline.cpu_lanes=1",
             "data.pipeline.producer=process", "data.pipeline.assemble_ahead=1"]
    check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128", *speed]),
                           saved, source)
    many = [f"optim.{k}=0.5" for k in ("base_lr", "min_lr", "weight_decay", "layer_decay",
                                       "patch_embed_lr_mult", "pmm_lr_mult", "clip_grad")]
    with pytest.raises(ConfigError, match=r"optim\.base_lr: .*; and 2 more\); resume with the "
                                          r"config the checkpoint was trained with") as info:
        check_resumable_config(load_config("tiny_cpu", ["model.head.prototypes=128"] + many),
                               saved, source)
    assert str(info.value).count(" -> 0.5") == 5               # the first five are listed


def test_a_restart_at_step_1_says_what_it_replaces(tmp_path):
    from tcore.train import _replaced_history
    assert _replaced_history(tmp_path) == ""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert _replaced_history(tmp_path) == (" (the 3 steps metrics.jsonl holds, and "
                                           "TensorBoard's, are replaced)")


def test_an_output_the_os_refuses_is_one_line_naming_it(synth_shards, tmp_path):
    """A read-only or forbidden --output gave a traceback from the lock's mkdir (README
    promises one line naming the file). sysfs refuses mkdir to root as well; a name longer
    than the file system allows is refused when it is looked up."""
    refused = Path("/sys/tcore-test-run")
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs sysfs (Linux)")
    # EPERM where sysfs is mounted read-write, EROFS where read-only (Docker's default)
    for output, said in ((refused, f"{refused}: cannot write: "),
                         (tmp_path / ("x" * 300), "cannot be used: File name too long")):
        result = CliRunner().invoke(cli, ["train", "--data", str(synth_shards), "--output",
                                          str(output), "--max-steps", "1", "--no-progress",
                                          *FAST])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert said in result.output, result.output


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
