"""Tests of `tcore bench`: statistics, FLOP counting, synthetic batches, reports, the commands.

Sizes are tiny (vit_tiny, batch 2, 96-px local crops) so the whole file runs in well under a
minute and a half on 2 CPU cores; nothing here asserts a speed.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tcore.bench.flops import (count_flops, matmul_flops, measure_matmul_peak,
                               vit_block_forward_flops)
from tcore.bench.report import (build_report, compare_ratio, format_report, parse_overrides,
                                read_report, write_json_atomic)
from tcore.bench.stats import median, percentile, summarize, time_repeats
from tcore.synthetic_batch import make_synthetic_batch

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {"global_crops", "local_crops", "past_crops", "future_crops", "masks",
                 "mask_indices", "mask_weights", "n_masked", "frame_indices", "labels"}


# ---- statistics ---------------------------------------------------------------------------

def test_percentiles_match_linear_interpolation_on_known_inputs():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert median(values) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([10.0, 20.0], 90) == pytest.approx(19.0)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0, 100"):
        percentile([1.0], 101)


def test_summary_spread_is_the_interquartile_range():
    summary = summarize([1.0, 2.0, 3.0, 4.0, 100.0], unit="s")
    assert summary.median == 3.0
    assert summary.p25 == 2.0 and summary.p75 == 4.0 and summary.spread == 2.0
    assert summary.min == 1.0 and summary.max == 100.0 and summary.n == 5
    assert summary.p90 == pytest.approx(61.6)
    assert summary.as_dict()["unit"] == "s"
    single = summarize([7.0])
    assert single.median == 7.0 and single.spread == 0.0


# ---- FLOPs ---------------------------------------------------------------------------------

def test_flop_count_of_a_matmul_matches_2mkn():
    a, b = torch.randn(32, 48), torch.randn(48, 16)
    assert count_flops(lambda: a @ b) == matmul_flops(32, 48, 16) == 2 * 32 * 48 * 16
    # Forward + backward of a linear layer: 1 forward matmul, 2 backward (input and weight).
    layer = torch.nn.Linear(48, 16, bias=False)
    x = torch.randn(32, 48, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * matmul_flops(32, 48, 16)


def test_flop_count_of_one_vit_block_matches_the_analytic_formula():
    from tcore.models import build_backbone

    # One block of the real backbone (vit_tiny: dim 192), explicit-matmul attention.
    tokens, dim, batch = 1 + 4 + 196, 192, 2
    block = build_backbone("vit_tiny", attention="math").blocks[0].eval()
    x = torch.randn(batch, tokens, dim)
    with torch.no_grad():
        counted = count_flops(lambda: block(x))
    assert counted == batch * vit_block_forward_flops(tokens, dim, 4.0)
    # 24 T D^2 + 4 T^2 D, the textbook figure.
    assert vit_block_forward_flops(tokens, dim) == 24 * tokens * dim**2 + 4 * tokens**2 * dim


# ---- synthetic batches ---------------------------------------------------------------------

def test_synthetic_batch_follows_the_batch_contract():
    batch_size, n_local = 3, 2
    batch = make_synthetic_batch(batch_size, "cpu", n_local=n_local, seed=1)
    assert set(batch) == CONTRACT_KEYS
    assert batch["global_crops"].shape == (2 * batch_size, 3, 224, 224)
    assert batch["past_crops"].shape == batch["future_crops"].shape == (2 * batch_size, 3, 224, 224)
    assert batch["local_crops"].shape == (n_local * batch_size, 3, 96, 96)
    assert batch["masks"].shape == (2 * batch_size, 196) and batch["masks"].dtype == torch.bool
    masks = batch["masks"]
    per_crop = masks.sum(dim=1)
    # METHOD.md section 3: int(2B * 0.5) crops masked, each with 10%..50% of the 196 patches.
    assert int((per_crop > 0).sum()) == int(2 * batch_size * 0.5)
    assert all(int(196 * 0.1) <= c <= int(196 * 0.5) for c in per_crop.tolist() if c > 0)
    indices = batch["mask_indices"]
    assert indices.dtype == torch.int64
    assert torch.equal(indices, masks.flatten().nonzero().flatten())
    assert int(batch["n_masked"].item()) == indices.numel() == int(masks.sum())
    crop_of_token = indices // 196
    expected_weights = 1.0 / per_crop[crop_of_token].float()
    assert torch.allclose(batch["mask_weights"], expected_weights)
    # Weights of one crop's tokens sum to 1, so the total is the number of masked crops.
    assert batch["mask_weights"].sum().item() == pytest.approx(float((per_crop > 0).sum()))
    frames = batch["frame_indices"]
    assert frames.shape == (batch_size, 3)
    assert bool((frames[:, 0] < frames[:, 1]).all() and (frames[:, 1] < frames[:, 2]).all())
    assert batch["labels"].shape == (batch_size,) and batch["labels"].dtype == torch.int64
    again = make_synthetic_batch(batch_size, "cpu", n_local=n_local, seed=1)
    assert all(torch.equal(batch[k], again[k]) for k in CONTRACT_KEYS)


# ---- reports -------------------------------------------------------------------------------

def test_compare_overrides_are_typed_and_checked():
    settings = {"attention": "sdpa", "precision": "bf16", "compile": False, "batch": 4}
    changed = parse_overrides("attention=math, precision=fp32,compile=true,batch=8", settings)
    assert changed == {"attention": "math", "precision": "fp32", "compile": True, "batch": 8}
    with pytest.raises(ValueError, match="not a setting"):
        parse_overrides("atention=math", settings)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides("math", settings)
    with pytest.raises(ValueError, match="boolean"):
        parse_overrides("compile=maybe", settings)


def test_compare_overrides_take_several_config_keys():
    settings = {"batch": 4, "overrides": "gpu_lanes=4"}
    changed = parse_overrides("overrides=gpu_lanes=8,views.local.jitter_p=0,batch=8", settings)
    assert changed == {"batch": 8, "overrides": "gpu_lanes=8,views.local.jitter_p=0"}
    with pytest.raises(ValueError, match="not a setting"):  # only after overrides=
        parse_overrides("batch=8,views.local.jitter_p=0", settings)


def fake_result(samples_per_s: float, attention: str) -> dict:
    figure = summarize([samples_per_s, samples_per_s * 1.1, samples_per_s * 0.9], "samples/s")
    return {"kind": "model", "settings": {"arch": "vit_tiny", "attention": attention},
            "figures": {"samples_per_s": figure.as_dict()},
            "environment": {"device_name": "test cpu"}}


def test_report_ratio_json_round_trip(tmp_path):
    report = build_report([fake_result(30.0, "sdpa"), fake_result(10.0, "math")])
    assert report["compare"]["ratio"] == pytest.approx(3.0)
    assert report["compare"]["changed"] == {"attention": ("sdpa", "math")}
    text = format_report(report)
    assert "ratio samples_per_s first/second = 3.000" in text
    path = write_json_atomic(tmp_path / "out" / "r.json", report)
    assert read_report(path)["compare"]["ratio"] == pytest.approx(3.0)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_report(tmp_path / "bad.json")
    assert compare_ratio(report["runs"][0], report["runs"][0])["ratio"] == pytest.approx(1.0)


def gpu_result(kind: str, samples_per_s: float, mfu: float | None = None, **settings) -> dict:
    figures = {"samples_per_s": {"median": samples_per_s}}
    if mfu is not None:
        figures["mfu"] = {"median": mfu}
    # The targets' work: batch 64, full-size views (bench model's settings; the loaders'
    # defaults), no overrides.
    views = {"global_size": 224, "local_size": 96, "n_local": 8} if kind == "model" else {}
    return {"kind": kind, "settings": {"batch": 64, "compile": False, "overrides": "", **views,
                                       **settings},
            "figures": figures, "environment": {"device": "cuda", "device_name": "test gpu"},
            "details": {}}


def test_targets_are_checked_against_matching_runs():
    from tcore.bench.targets import check_targets

    fast = gpu_result("model", 400.0, 0.40, arch="vit_small", attention="xformers", precision="bf16")
    slow = gpu_result("model", 100.0, 0.05, arch="vit_small", attention="math", precision="fp32")
    base = gpu_result("model", 150.0, 0.44, arch="vit_base", attention="xformers", precision="bf16")
    data = gpu_result("data", 700.0, loader="dali", data="s", threads=8)
    train = gpu_result("train", 390.0, arch="vit_small", attention="xformers", precision="bf16")
    checks = {c.name: c for c in check_targets({"r": {"runs": [fast, slow, base, data, train]}})}
    assert checks["MFU vit_small bf16 batch 64"].passed is True
    assert checks["MFU vit_base bf16 batch 64"].passed is False      # 44% < 45%
    assert checks["vit_small best bf16 / eager fp32 math"].measured == "4.00x"
    assert checks["vit_base best bf16 / eager fp32 math"].passed is None  # no fp32 run of it
    assert checks["DALI GPU / ViT-S step samples/s"].passed is False  # 1.75x < 2x
    assert checks["end to end / model-only samples/s"].measured == "97.5%"
    assert checks["DALI CPU / baseline loader samples/s"].passed is None


# ---- the commands, end to end on the CPU ---------------------------------------------------

TINY_MODEL = ["--arch", "vit_tiny", "--batch", "1", "--device", "cpu",  # precision auto: fp32
              "--global-size", "64", "--local-size", "32", "--local-crops", "1",
              "--warmup", "0", "--repeats", "2", "--steps", "1", "--peak-size", "256",
              "--set", "model.head.prototypes=256,model.head.hidden=128"]


# Smaller crops and head for the end-to-end run: the loader draws 64/32-px views, 1 local crop.
TINY_VIEWS = ("model.head.prototypes=256,model.head.hidden=128,model.img_size=64,"
              "data.pipeline.views.global_size=64,data.pipeline.views.local_size=32,"
              "data.pipeline.views.n_local=1")


def run_cli(args: list[str]):
    from tcore.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def assert_summary(figure: dict, unit: str, n: int):
    assert figure["unit"] == unit and figure["n"] == n
    assert figure["min"] <= figure["p25"] <= figure["median"] <= figure["p75"] <= figure["max"]
    assert figure["spread"] == pytest.approx(figure["p75"] - figure["p25"])


def test_bench_model_writes_every_figure_and_compares(tmp_path):
    path, profile = tmp_path / "model.json", tmp_path / "profile"
    output = run_cli(["bench", "model", *TINY_MODEL, "--attention", "sdpa",
                      "--compare", "attention=math", "--json", str(path),
                      "--profile", str(profile)])
    assert "ratio samples_per_s first/second" in output and "mfu" in output
    report = json.loads(path.read_text())
    first, second = report["runs"]
    # Only the first configuration is profiled; the model has no tcore ranges, and the
    # CPU table's heading says so.
    assert "profile" in first["details"] and "profile" not in second["details"]
    assert (profile / "cpu.txt").read_text().startswith(
        "3 steps, tcore ranges (CPU time, every thread): none\n\nsorted by cpu_time_total")
    assert first["settings"]["attention"] == "sdpa" and second["settings"]["attention"] == "math"
    for run in (first, second):
        figures = run["figures"]
        assert_summary(figures["step_time"], "s", 2)
        assert_summary(figures["samples_per_s"], "samples/s", 2)
        # MFU per repeat is FLOPs per step / step time / the measured peak. (Not bounded by
        # 1 here: on a shared CPU the tiny peak's best round can read below the step's rate.)
        flops_per_s = [figures["flops_per_step"] / figures["step_time"][k] for k in ("max", "min")]
        assert [figures["mfu"]["min"], figures["mfu"]["max"]] == pytest.approx(
            [rate / figures["peak_flops_per_s"] for rate in flops_per_s])
        assert figures["mfu"]["median"] > 0
        assert figures["step_time"]["median"] > 0
        # samples/s is batch / step time per repeat (batch 1): extremes swap; and with an
        # even number of repeats (2) the medians agree too.
        assert figures["samples_per_s"]["max"] == pytest.approx(1 / figures["step_time"]["min"])
        assert figures["samples_per_s"]["min"] == pytest.approx(1 / figures["step_time"]["max"])
        assert figures["samples_per_s"]["median"] * figures["step_time"]["median"] == \
            pytest.approx(1, rel=1e-12)
        assert figures["flops_per_step"] > 0
        assert figures["flops_per_sample"] == figures["flops_per_step"]  # batch 1
        assert figures["peak_flops_per_s"] > 0
        # The process's peak RSS: measured when it grew during the run, else left unmeasured.
        assert figures["peak_memory"] is None or figures["peak_memory"]["median"] > 0
        assert figures["cpu_seconds_per_sample"] > 0
        details = run["details"]
        assert math.isfinite(details["loss_after_bench"])
        assert details["precision_resolved"] == "fp32" and details["peak_matmul"]["dtype"] == "float32"
        environment = run["environment"]
        assert environment["device"] == "cpu" and environment["device_name"]
        assert environment["libraries"]["torch"] == torch.__version__.split("+")[0] or \
            environment["libraries"]["torch"].startswith(torch.__version__.split("+")[0])
        assert environment["date_utc"].startswith("20")
    # The FLOPs are the model's, not the attention kernel's: the same for both backends.
    assert first["figures"]["flops_per_step"] == second["figures"]["flops_per_step"]
    assert first["details"]["attention_resolved"] == "sdpa"
    ratio = report["compare"]["ratio"]
    assert ratio == pytest.approx(first["figures"]["samples_per_s"]["median"]
                                  / second["figures"]["samples_per_s"]["median"])
    assert f"{ratio:.3f}" in output


def test_step_flops_scale_with_the_batch():
    from tcore.bench.model import bench_config, build_trainer, forward_backward_flops

    device = torch.device("cpu")
    cfg = bench_config("vit_tiny", "sdpa", "fp32", False, 2, device,
                       overrides="model.head.prototypes=256,model.head.hidden=128,model.img_size=64")
    trainer = build_trainer(cfg, device)

    def flops(batch_size: int) -> int:
        batch = make_synthetic_batch(batch_size, device, n_local=1, global_size=64, local_size=32)
        return forward_backward_flops(trainer.model, batch, "fp32", device)

    one, two = flops(1), flops(2)
    # Backbones, heads and PMM scale with the batch; only the masked-token work follows the
    # masks drawn, so per-sample FLOPs agree within that share.
    assert two > 1.5 * one
    assert two / 2 == pytest.approx(one, rel=0.25)
    # The backend is restored after counting with explicit-matmul attention.
    assert {layer.backend for layer in trainer.model.modules() if hasattr(layer, "backend")} == {"sdpa"}
    # Forward and backward are both counted: the backward costs about twice the student's
    # share of the forward and the teacher has none (here 1.69x the forward alone; the
    # count is exact, the batch seeded), never more than 3x.
    from tcore.models.attention import set_attention_backend

    set_attention_backend(trainer.model, "math")
    batch = make_synthetic_batch(1, device, n_local=1, global_size=64, local_size=32)
    forward = count_flops(lambda: trainer.model.forward_losses(batch, 0.07))
    assert 1.3 * forward < one <= 3 * forward


class CountingLoader:
    """A real loader with the batches it hands out counted (`drawn`), and optionally the
    clock moved by `costs` per batch; everything else passes through to it."""

    def __init__(self, loader, clock=None, costs=()):
        self._loader, self.drawn, self._clock, self._costs = loader, 0, clock, iter(costs)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for batch in self._loader:
            self.drawn += 1
            if self._clock is not None:
                self._clock.advance(next(self._costs))
            yield batch


def test_bench_data_times_both_loaders_on_the_same_shards(synth_shards, tmp_path, monkeypatch):
    from tcore.bench import data as bench_data

    built, build = [], bench_data.build_named_loader
    monkeypatch.setattr(bench_data, "build_named_loader",
                        lambda *a, **k: built.append(CountingLoader(build(*a, **k))) or built[-1])
    cpu_readings, cpu_seconds = [], bench_data.process_tree_cpu_seconds
    monkeypatch.setattr(bench_data, "process_tree_cpu_seconds",
                        lambda: cpu_readings.append(cpu_seconds()) or cpu_readings[-1])
    path = tmp_path / "data.json"
    # The colour stage eager: compiling it is what other tests check (test_torch_photometric).
    # (This does not shorten the suite: on a cold compiler cache the first compile of the
    # stage, ~40 s, falls to the next test that compiles it, bench train's.)
    output = run_cli(["bench", "data", "--data", str(synth_shards), "--loader", "both",
                      "--device", "cpu", "--threads", "1", "--batch", "2", "--seconds", "1",
                      "--warmup", "1", "--repeats", "2", "--json", str(path),
                      "--set", "photometric_compile=false"])
    assert "ratio samples_per_s first/second" in output
    report = json.loads(path.read_text())
    assert [run["settings"]["loader"] for run in report["runs"]] == ["dali", "baseline"]
    for run in report["runs"]:
        figures, details = run["figures"], run["details"]
        assert details["batches"] >= 2 and details["samples"] == 2 * details["batches"]
        assert figures["samples_per_s"]["median"] > 0
        # Two windows: the median rate is that of the median time per sample (the two
        # windows' mean), not the mean of the two rates.
        rate = figures["samples_per_s"]
        assert rate["median"] == pytest.approx(2 / (1 / rate["min"] + 1 / rate["max"]),
                                               rel=1e-12)
        latency = figures["batch_latency"]
        assert 0 < figures["batch_latency_p50"] <= figures["batch_latency_p90"] <= figures["batch_latency_p99"]
        assert latency["max"] >= figures["batch_latency_p99"]
        # Throughput over the measured batches is samples / summed latency.
        assert figures["overall_samples_per_s"] == pytest.approx(
            details["samples"] / details["measured_seconds"])
        assert figures["cpu_seconds_per_sample"] > 0
        assert figures["batch_latency_p50"] == latency["median"]
        assert figures["batch_latency_p90"] == latency["p90"]
        assert figures["batch_latency_p99"] == latency["p99"]
        # Short windows are flagged; the clock starts only after the prefetched batches.
        assert bool(run["warnings"]) == (details["batches"] < 10)
    # Every batch drawn was either a warm-up batch or a timed one; DALI's warm-up covers the
    # batches its prefetch made before the clock started.
    assert [loader.drawn for loader in built] == [
        run["details"]["warmup_batches"] + run["details"]["batches"] for run in report["runs"]]
    assert report["runs"][0]["details"]["warmup_batches"] >= built[0].prefetch + 1 >= 3
    assert report["runs"][1]["details"]["warmup_batches"] == 1   # the baseline: as asked
    # CPU seconds per *sample*: the process tree's CPU time over the timed batches (read just
    # before and after them, once per run) over the samples in them.
    assert len(cpu_readings) == 4
    for run, (before, after) in zip(report["runs"], (cpu_readings[:2], cpu_readings[2:])):
        assert run["figures"]["cpu_seconds_per_sample"] == pytest.approx(
            (after - before) / run["details"]["samples"])
    # What "auto" resolved to is reported (CPU loader, the default torchvision jitter: CPU
    # decode, torch colour stage).
    assert report["runs"][0]["details"]["video_decode"] == "cpu"
    assert report["runs"][0]["details"]["colour_stage"] == "torch"
    assert report["runs"][0]["details"]["stage_a"] == "thread"
    assert 0 < report["runs"][0]["details"]["stage_a_ms_per_batch"] < 1e3 * max(
        report["runs"][0]["figures"]["batch_latency"]["max"], 1.0)
    # next()'s parts over the measured batches account for its whole time (the clock's
    # own cost and the device sync aside), and the terminal shows them.
    dali = report["runs"][0]
    phases = dali["details"]["next_ms_per_batch"]
    assert set(phases) == {"stage_b_wait", "assemble", "feed_next"}
    assert all(ms >= 0 for ms in phases.values())
    mean_latency_ms = 1e3 * dali["details"]["measured_seconds"] / dali["details"]["batches"]
    assert 0.9 * mean_latency_ms <= sum(phases.values()) <= mean_latency_ms
    assert "loader ms / batch" in output and "stage_b_wait" in output
    assert "next_ms_per_batch" not in report["runs"][1]["details"]    # the baseline has none
    assert report["compare"]["changed"] == {"loader": ["dali", "baseline"]}


def test_bench_train_reports_samples_and_data_wait(synth_shards, tmp_path):
    path = tmp_path / "train.json"
    profile = tmp_path / "profile"
    output = run_cli(["bench", "train", "--data", str(synth_shards), "--loader", "dali",
                      "--arch", "vit_tiny", "--batch", "2", "--precision", "fp32",
                      "--device", "cpu", "--threads", "1", "--warmup", "0", "--steps", "2",
                      "--repeats", "1", "--set", TINY_VIEWS + ",data.pipeline.producer=process",
                      "--json", str(path), "--profile", str(profile)])
    assert "data_wait_fraction" in output
    run = json.loads(path.read_text())["runs"][0]
    # As `bench data` flags fewer than 10 batches, a train run flags fewer than 10 steps.
    assert run["warnings"] == ["only 2 steps were timed: raise --steps for a steady figure "
                               "(>= 10 steps)"]
    assert "warning: only 2 steps were timed" in output
    # each timed step's host time, and the terminal names the slowest
    host_ms = run["details"]["step_host_ms"]
    assert len(host_ms) == 2 and all(ms > 0 for ms in host_ms)
    slowest = host_ms.index(max(host_ms)) + 1
    assert f"slowest {max(host_ms):.1f} (step {slowest} of 2)" in output
    assert run["details"]["stage_a"] == "process"     # as asked (the default on a GPU)
    # next()'s parts, per timed step, fit inside the time the step waited in next().
    phases = run["details"]["next_ms_per_batch"]
    assert set(phases) == {"stage_b_wait", "assemble", "feed_next"}
    assert 0 < sum(phases.values()) <= 1e3 * run["figures"]["data_wait"]["median"] * 1.001  # 2 steps: the mean
    # The profile covers the loader too: its named ranges are in the CPU table.
    assert run["details"]["profile"]["steps"] == 3
    cpu_table = (profile / "cpu.txt").read_text()
    assert "tcore.loader.stage_b_wait" in cpu_table and "tcore.loader.assemble" in cpu_table
    assert (profile / "kernels.txt").exists() and (profile / "trace.json").exists()
    # The timeline: the three profiled steps' wall time, no device on the CPU.
    timeline = run["details"]["profile"]["timeline"]
    assert timeline["steps"] == 3 and timeline["wall_ms"] > 0
    assert timeline["device_busy_ms"] is None and timeline["streams"] == {}
    assert "device: no device activity recorded" in (profile / "timeline.txt").read_text()
    figures = run["figures"]
    assert run["details"]["steps"] == 2 and run["details"]["samples"] == 4
    assert run["settings"]["loader"] == "dali"
    assert 0 <= figures["data_wait_fraction"]["median"] < 1
    # ... and the window's summed wait over its time: (mean wait) / (mean step time).
    assert figures["data_wait_fraction"]["median"] == pytest.approx(
        figures["data_wait"]["median"] / figures["step_time"]["median"])
    # The model-only steps ran (loader closed) and give the run's own end-to-end fraction.
    assert run["details"]["model_only_steps"] == 2
    assert figures["model_only_samples_per_s"]["median"] > 0
    assert figures["model_only_before_samples_per_s"]["n"] == 1   # the --repeats 1 window
    assert figures["end_to_end_fraction"] == pytest.approx(
        figures["samples_per_s"]["median"] / max(figures["model_only_samples_per_s"]["median"],
                                                 figures["model_only_before_samples_per_s"]["median"]))
    assert "model_only_samples_per_s" in output and "end_to_end_fraction" in output
    # One window of 2 steps of 2 samples: samples/s is 2 over the mean step time.
    assert figures["samples_per_s"]["median"] == pytest.approx(2 / figures["step_time"]["median"])
    assert figures["data_wait"]["n"] == 2
    assert figures["samples_per_s"]["median"] > 0


def test_bench_train_with_batches_made_ahead_reports_the_wait_for_them(synth_shards, tmp_path):
    """`data.pipeline.assemble_ahead`: next() only waits for the loader's thread, whose parts
    are reported as its own, and the warm-up covers the batch it makes ahead too."""
    path = tmp_path / "train.json"
    output = run_cli(["bench", "train", "--data", str(synth_shards), "--arch", "vit_tiny",
                      "--batch", "2", "--precision", "fp32", "--device", "cpu", "--threads",
                      "1", "--warmup", "0", "--steps", "2", "--repeats", "1", "--set",
                      TINY_VIEWS + ",data.pipeline.assemble_ahead=1,train.step_stream=high_priority",
                      "--json", str(path),
                      "--profile", str(tmp_path / "profile")])
    run = json.loads(path.read_text())["runs"][0]
    details = run["details"]
    assert details["assemble_ahead"] == 1
    assert details["step_stream"] == "high_priority"     # as asked (no effect on the CPU)
    assert set(details["next_ms_per_batch"]) == {"ahead_wait", "stage_b_wait", "assemble",
                                                 "feed_next"}
    # next()'s only part is the wait for the thread (2 steps: their mean)
    assert details["next_ms_per_batch"]["ahead_wait"] <= \
        1e3 * run["figures"]["data_wait"]["median"] * 1.001
    assert "(next()); stage_b_wait" in output and "(the loader's thread)" in output
    assert details["warmup_steps"] == 2 + 1 + 1     # stage B's 2, the one ahead, one more
    # the profile's tcore ranges include the loader thread's, not only the training thread's
    ranges = (tmp_path / "profile" / "cpu.txt").read_text().split("sorted by")[0]
    assert "tcore.loader.ahead_wait" in ranges and "tcore.loader.assemble" in ranges
    assert details["steps"] == 2 and run["figures"]["samples_per_s"]["median"] > 0


def test_bench_errors_name_the_problem(tmp_path):
    from tcore.cli import main

    result = CliRunner().invoke(main, ["bench", "model", *TINY_MODEL, "--compare", "atention=math"])
    assert result.exit_code != 0 and "atention" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = CliRunner().invoke(main, ["bench", "table", str(bad)])
    assert result.exit_code != 0 and "bad.json" in result.output


def test_gpu_check_script_runs_in_cpu_mode(tmp_path):
    """The script's machinery (step runner, budget, table, bundle) on its cheapest steps."""
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "GPU_CHECK_CPU": "1",
           "GPU_CHECK_ONLY": "agree", "GPU_CHECK_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    assert "agree              ok" in summary and "sdpa vs math" in summary and "targets:" in summary
    bundle = json.loads((out / "reports.json").read_text())
    assert bundle["agree"]["agree"] is True
    assert bundle["agree"]["differences"]["patch"]["max_rel"] < 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "reports.json", "summary.txt"]
    # The GPU tests' two groups (all skipped on the CPU): a GPU_CHECK_TESTS filter naming
    # tests of one group only leaves the other with none selected, which is not a failure.
    env.update(GPU_CHECK_ONLY="gputests gputests_dali", GPU_CHECK_TESTS="jpeg_frames")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "gputests           ok" in summary and "gputests_dali      ok" in summary, summary
    log = (out / "gpu_check.log").read_text()
    assert "no tests of group core selected" in log and "1 selected" in log


def test_gpu_session_script_overlaps_and_collects_in_cpu_mode(synth_root, synth_shards,
                                                            tmp_path):
    """scripts/gpu_session.sh: `background` runs gpu_check.sh detached from a snapshot of
    the tree, `progress` reports it, `finish` waits for it, collects its files under
    model/ and runs the DALI steps into data/ (here the cheapest steps, on the CPU: stage A
    alone, on JPEG-frame shards)."""
    from tcore.preprocess.shards import build_shards

    frames = tmp_path / "frames"
    build_shards(synth_root / "train", frames, frames=8, short_side=64, codec="jpegs",
                 samples_per_shard=6, workers=1, progress=False)
    script = REPO / "scripts" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "GPU_CHECK_CPU": "1",
           "PYTHON": sys.executable, "GPU_SESSION_DIR": str(tmp_path / "session"),
           "GPU_SESSION_MODEL_STEPS": "agree", "GPU_SESSION_DATA_STEPS": "stage_a",
           "GPU_CHECK_SHARDS": str(synth_shards), "GPU_CHECK_FRAME_SHARDS": str(frames),
           "GPU_SESSION_WAIT": "120"}
    started = subprocess.run(["bash", str(script), "background"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 0 and "background gpu_check started" in started.stdout
    progress = subprocess.run(["bash", str(script), "progress"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert "gpu_check" in progress.stdout
    done = subprocess.run(["bash", str(script), "finish"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "background finished (rc 0)" in done.stdout
    assert "agree              ok" in (out / "model" / "summary.txt").read_text()
    assert "stage_a            ok" in (out / "data" / "summary.txt").read_text()
    bundle = json.loads((out / "data" / "reports.json").read_text())
    (run,) = bundle["stage_a"]["runs"]
    assert run["settings"]["loader"] == "stage-a" and run["settings"]["data"] == str(frames)
    assert run["figures"]["samples_per_s"]["median"] > 0
    # Each gpu_check.sh run made its own scratch folder (no GPU_CHECK_WORK) and removed it.
    for half in ("model", "data"):
        (work,) = re.findall(r"work: (\S+)", (out / half / "gpu_check.log").read_text())
        assert Path(work).name.startswith("gpu_check.") and not Path(work).exists()


def test_process_tree_cpu_seconds_counts_child_processes():
    from tcore.bench.stats import process_tree_cpu_seconds

    before = process_tree_cpu_seconds()
    # A child that burns ~0.3 s of CPU and is still alive when we look.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time, sys\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "sys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "done\n"
        during = process_tree_cpu_seconds()
    finally:
        child.kill()
        child.wait()
    assert during - before >= 0.25


def test_bench_data_pipeline_overrides_are_typed_and_checked():
    from tcore.bench.data import pipeline_config_from

    config = pipeline_config_from("views.color_jitter=fast,views.n_local=4,views.global_scale=[0.4,1.0]")
    assert config.views.color_jitter == "fast" and config.views.n_local == 4
    assert config.views.global_scale == (0.4, 1.0)
    with pytest.raises(ValueError, match="nope"):
        pipeline_config_from("views.nope=1")


def test_jpeg_decode_probe_decodes_the_drawn_frames_both_ways(synth_root, synth_shards, tmp_path):
    """scripts/jpeg_decode_probe.py (a gpu_check step): stage A's drawn JPEGs decoded by
    three decoders of a batch each and by one over the whole batch, on the CPU here."""
    from tcore.preprocess.shards import build_shards

    frames = tmp_path / "frames"
    build_shards(synth_root / "train", frames, frames=8, short_side=64, codec="jpegs",
                 samples_per_shard=6, workers=1, progress=False)
    script = REPO / "scripts" / "jpeg_decode_probe.py"
    out = tmp_path / "probe.jsonl"
    done = subprocess.run([sys.executable, "-P", str(script), str(frames), "--configs",
                           "cpu:1:three,cpu:1:one", "--batch", "4", "--batches", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["device"], r["layout"], r["batch"]) for r in lines] == [("cpu", "three", 4),
                                                                      ("cpu", "one", 4)]
    assert all(r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] > 0 for r in lines)
    assert done.stdout.splitlines() == out.read_text().splitlines()
    # Clip shards are refused with what to build instead.
    refused = subprocess.run([sys.executable, "-P", str(script), str(synth_shards)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--codec jpegs" in refused.stderr


def test_settings_labels_show_overrides_only_when_set():
    from tcore.bench.report import LABEL_KEYS, settings_label

    plain = {"loader": "dali", "device": "cuda", "threads": 16, "batch": 64, "overrides": ""}
    assert settings_label(plain, LABEL_KEYS["data"]) == "loader=dali device=cuda threads=16 batch=64"
    jitter = dict(plain, overrides="views.color_jitter=fast")
    assert settings_label(jitter, LABEL_KEYS["data"]).endswith(" overrides=views.color_jitter=fast")


# ---- the arithmetic behind the figures, on a clock that moves only when told ---------------
#
# Timing on a shared CPU is noise, so these tests put a `FakeClock` where a bench module reads
# `time.perf_counter` (that module's own name `time`, nothing global) and make the work itself
# move it by known amounts: every figure is then an exact function of those amounts.

class FakeClock:
    """`time.perf_counter` as arithmetic: `advance` moves it; each read also moves it by
    `tick * k` for the k-th read (so that no two intervals read the same)."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick, self.reads = 0.0, tick, 0

    def perf_counter(self) -> float:
        value = self.now
        self.reads += 1
        self.now += self.tick * self.reads
        return value

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_repeats_times_only_the_repeats_with_the_device_synchronised(monkeypatch):
    from tcore.bench import stats

    clock = FakeClock()
    monkeypatch.setattr(stats, "time", clock)
    costs = iter([100.0] * 3 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])   # 3 warm-up calls, then 3 x 2
    synced = []

    def synchronize():   # the queued device work of the calls so far finishes: 0.5 s
        synced.append(clock.now)
        clock.advance(0.5)

    seconds = time_repeats(lambda: clock.advance(next(costs)), warmup=3, repeats=3,
                           iterations=2, synchronize=synchronize)
    # Per call: the repeat's two calls and its closing synchronisation, over 2. The warm-up
    # (300 s) is in no repeat; the device is synchronised after the warm-up and in each repeat.
    assert seconds == [(1 + 2 + 0.5) / 2, (3 + 4 + 0.5) / 2, (5 + 6 + 0.5) / 2]
    assert len(synced) == 1 + 3
    for bad in ({"repeats": 0}, {"repeats": 1, "iterations": 0}, {"repeats": 1, "warmup": -1}):
        with pytest.raises(ValueError, match="repeats"):
            time_repeats(lambda: None, **{"warmup": 0, **bad})


def test_matmul_peak_is_the_best_round_of_2n3_flops(monkeypatch):
    from tcore.bench import stats

    reads = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])   # rounds of 2, 1 and 4 s
    monkeypatch.setattr(stats, "time", types.SimpleNamespace(perf_counter=lambda: next(reads)))
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32, size=8, repeats=3, iterations=2)
    # 2 * 8^3 FLOPs per product, 2 products per round: 1.0, 0.5 and 2.0 s per product.
    assert peak["flops_per_s"] == 2 * 8**3 / 0.5            # the best round
    assert peak["median_flops_per_s"] == 2 * 8**3 / 1.0     # the median round
    assert (peak["size"], peak["dtype"], peak["repeats"], peak["iterations"]) == (8, "float32", 3, 2)


def test_mfu_is_measured_against_the_dtype_the_readme_names():
    from tcore.bench.flops import peak_dtype_for
    from tcore.bench.model import measured_peak

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    # On a GPU: the bf16 tensor-core rate (fp16 for fp16 runs), fp32 steps included.
    assert [peak_dtype_for(p, gpu) for p in ("fp32", "bf16", "fp16")] == [
        torch.bfloat16, torch.bfloat16, torch.float16]
    # On the CPU: the step's own dtype.
    assert [peak_dtype_for(p, cpu) for p in ("fp32", "bf16", "fp16")] == [
        torch.float32, torch.bfloat16, torch.float16]
    # The per-process peak cache keeps dtypes apart: an fp32 and a bf16 run of a --compare
    # are each measured against their own peak.
    assert measured_peak(cpu, torch.float32, 32)["dtype"] == "float32"
    assert measured_peak(cpu, torch.bfloat16, 32)["dtype"] == "bfloat16"


def test_bench_model_figures_follow_from_the_timed_steps(monkeypatch):
    """Warm-up untimed, the device synchronised in each repeat, samples/s = batch / step
    time, MFU = FLOPs per step / step time / the reported peak, CPU time per sample."""
    from tcore.bench import model as bench_model
    from tcore.bench import run_bench, stats
    from tcore.train import Trainer

    clock = FakeClock(tick=2.0**-20)
    monkeypatch.setattr(stats, "time", clock)
    monkeypatch.setattr(bench_model, "_PEAKS", {})   # measured on this clock, not cached
    # Each step moves the clock: the warm-up step 100 s, the timed ones 1, 2, 3, 4 s.
    costs, real_step = iter([100.0, 1.0, 2.0, 3.0, 4.0]), Trainer.step

    def step(self, it, batch):
        clock.advance(next(costs))
        return real_step(self, it, batch)

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(bench_model, "synchronizer", lambda device: lambda: clock.advance(0.25))
    cpu_reads = iter([10.0, 16.0])
    monkeypatch.setattr(bench_model, "process_tree_cpu_seconds", lambda: next(cpu_reads))
    settings = bench_model.ModelBenchSettings(
        arch="vit_tiny", batch=2, precision="fp32", device="cpu", n_local=1, global_size=64,
        local_size=32, warmup=1, repeats=2, steps=2, peak_size=32,
        overrides="model.head.prototypes=256,model.head.hidden=128")
    run = run_bench("model", settings)["runs"][0]
    with pytest.raises(StopIteration):
        next(costs)                                  # 1 warm-up + 2 repeats x 2 steps, no more
    figures = run["figures"]
    # A repeat: its 2 steps and the closing sync (and the clock's own tick, < 1e-4 s), over 2.
    fast, slow = (1 + 2 + 0.25) / 2, (3 + 4 + 0.25) / 2
    per_step = [figures["step_time"][k] for k in ("min", "median", "max")]
    assert per_step == pytest.approx([fast, (fast + slow) / 2, slow], abs=1e-4)
    # Per repeat, samples/s = batch / step time and MFU = FLOPs / step time / peak; the
    # medians (of two repeats) are those of the median step time, not the means of the two
    # rates (which would be 17% higher here).
    rates = [2 / figures["step_time"]["max"], 2 / figures["step_time"]["min"]]
    assert [figures["samples_per_s"][k] for k in ("min", "median", "max")] == pytest.approx(
        [rates[0], 2 / figures["step_time"]["median"], rates[1]])
    flops, peak = figures["flops_per_step"], figures["peak_flops_per_s"]
    assert figures["flops_per_sample"] == flops / 2
    assert figures["achieved_flops_per_s"] == pytest.approx(flops / figures["step_time"]["median"])
    assert peak == run["details"]["peak_matmul"]["flops_per_s"] > run["details"]["peak_matmul"][
        "median_flops_per_s"]
    mfu = [flops / figures["step_time"]["max"] / peak, flops / figures["step_time"]["min"] / peak]
    assert [figures["mfu"][k] for k in ("min", "median", "max")] == pytest.approx(
        [mfu[0], flops / figures["step_time"]["median"] / peak, mfu[1]])
    assert figures["mfu"]["median"] == pytest.approx(
        figures["samples_per_s"]["median"] * figures["flops_per_sample"] / peak)
    # CPU seconds over the timed steps (2 repeats x 2 steps x batch 2), per sample.
    assert figures["cpu_seconds_per_sample"] == pytest.approx((16.0 - 10.0) / (2 * 2 * 2))


def test_time_batches_times_each_next_with_the_device_synchronised(monkeypatch):
    from tcore.bench import data as bench_data

    clock = FakeClock()
    monkeypatch.setattr(bench_data, "time", clock)
    monkeypatch.setattr(bench_data, "synchronizer", lambda device: lambda: clock.advance(0.5))
    costs = [50.0, 50.0, 1.0, 2.0, 3.0, 4.0]      # 2 warm-up batches, then 4 timed ones

    def batches():
        for number, cost in enumerate(costs):
            clock.advance(cost)
            yield {"labels": torch.zeros(number + 1)}

    latencies, sizes = bench_data.time_batches(batches(), seconds=10.0, warmup_batches=2,
                                               device=torch.device("cpu"))
    # Each next() and its sync; the loop stops at the first batch past 10 s of timing.
    assert latencies == [1.5, 2.5, 3.5, 4.5] and sizes == [3, 4, 5, 6]


def test_window_sums_are_over_consecutive_batches():
    from tcore.bench.stats import window_sums

    latencies, sizes = [1.0, 1.0, 2.0, 4.0, 1.0, 3.0], [2, 4, 2, 2, 3, 1]
    assert window_sums(latencies, 3) == [2, 6, 4] and window_sums(sizes, 3) == [6, 4, 4]
    assert window_sums(latencies, 1) == [12] and window_sums(sizes, 1) == [14]
    assert window_sums(latencies[:2], 5) == [1.0, 1.0]   # at most one window per batch
    assert window_sums(sizes[:5], 2) == [6, 7]            # bounds 0, 2, 5


def test_rates_are_summarised_as_the_rates_of_the_summarised_times():
    """`summarize_rate`: each figure is 1 / the time per unit's mirrored figure, so with an
    even number of repeats samples/s x time per sample is 1, median for median."""
    from tcore.bench.stats import summarize_rate

    seconds, samples = [2.0, 1.0, 8.0, 3.0], [4, 4, 8, 2]     # 0.5, 0.25, 1.0, 1.5 s a sample
    rate, time = summarize_rate(seconds, samples, "samples/s"), summarize([0.5, 0.25, 1.0, 1.5])
    assert rate.median == pytest.approx(1 / time.median) == pytest.approx(1 / 0.75)
    assert (rate.min, rate.max) == pytest.approx((1 / 1.5, 1 / 0.25))
    assert (rate.p25, rate.p75) == pytest.approx((1 / time.p75, 1 / time.p25))
    assert rate.spread == pytest.approx(rate.p75 - rate.p25) and rate.n == 4
    assert rate.p90 == pytest.approx(1 / percentile([0.5, 0.25, 1.0, 1.5], 10))
    # One amount for every repeat: a batch per step.
    assert summarize_rate([1.0, 3.0], 2).median == pytest.approx(2 / 2.0)


def test_baseline_thread_budget_is_its_worker_processes(synth_shards):
    from tcore.bench.data import build_named_loader, close_loader

    loader = build_named_loader("baseline", str(synth_shards), torch.device("cpu"), 2, 4, 0)
    try:
        assert loader.loader.num_workers == 2 and loader.loader.batch_size == 4
    finally:
        close_loader(loader)


# ---- what the terminal shows ---------------------------------------------------------------

def test_terminal_values_carry_their_units():
    from tcore.bench.report import format_figure, format_value, scalar_unit

    assert format_value(0.0123, "s") == "12.30 ms" and format_value(2.5, "s") == "2.50 s"
    assert format_value(0.225, "fraction") == "22.5%"
    assert format_value(1000 * 2**20, "bytes") == "1000 MiB"
    assert format_value(2.5e9, "flops") == "2.50 GFLOP"
    assert format_value(4.2e14, "flops_per_s") == "420.00 TFLOP/s"
    # The spread is the IQR, shown as ± half of it (README); none for a single value.
    figure = summarize([0.010, 0.012, 0.014, 0.016, 0.018], "s").as_dict()
    assert format_figure(figure) == "14.00 ms ± 2.00 ms"
    assert format_figure(summarize([0.5], "fraction").as_dict()) == "50.0%"
    assert [scalar_unit(n) for n in ("batch_latency_p90", "cpu_seconds_per_sample",
                                      "build_and_warmup_seconds", "peak_flops_per_s",
                                      "flops_per_sample", "data_wait_fraction")] == [
        "s", "s", "s", "flops_per_s", "flops", "fraction"]


def test_report_labels_each_run_with_its_own_resolved_settings():
    def run(attention, resolved, rate, mfu):
        return {"kind": "model", "settings": {"arch": "vit_small", "batch": 64, "attention": attention,
                                              "precision": "auto", "device": "cuda", "overrides": ""},
                "figures": {"samples_per_s": summarize([rate], "samples/s").as_dict(),
                            "mfu": summarize([mfu], "fraction").as_dict()},
                "details": {"attention_resolved": resolved, "precision_resolved": "bf16"},
                "environment": {"device_name": "H100"}}

    report = build_report([run("auto", "xformers", 500.0, 0.2), run("math", "math", 125.0, 0.05)])
    lines = format_report(report).splitlines()
    assert lines[0] == ("[bench model] arch=vit_small batch=64 attention=auto->xformers "
                        "precision=auto->bf16 device=cuda  on H100")
    second = next(line for line in lines[1:] if line.startswith("[bench model]"))
    assert "attention=math precision=auto->bf16" in second and "->math" not in second
    assert lines[-1] == "ratio samples_per_s first/second = 4.000  (attention: auto vs math)"
    from tcore.bench.report import format_summary_table

    table = format_summary_table({"r": report}).splitlines()
    assert "MFU 20.0%" in table[2] and "500.0" in table[2] and "MFU 5.0%" in table[3]
    assert table[4].split()[-1] == "4.000"
    # Train runs name their loader, in the header and in the table (a --compare of loaders).
    trains = [gpu_result("train", rate, arch="vit_small", device="cuda", loader=loader)
              for rate, loader in ((300.0, "dali"), (150.0, "baseline"))]
    for train in trains:
        train["environment"] = {"device_name": "H100"}
    headers = [line for line in format_report(build_report(trains)).splitlines()
               if line.startswith("[bench train]")]
    assert [" loader=dali " in headers[0], " loader=baseline " in headers[1]] == [True, True]
    rows = format_summary_table({"t": build_report(trains)}).splitlines()[2:4]
    assert " loader=dali " in rows[0] and " loader=baseline " in rows[1]
    # A train run: its data wait and its own end-to-end fraction (of the model-only rate).
    train = gpu_result("train", 278.0, arch="vit_small")
    train["figures"].update(data_wait_fraction=summarize([0.179, 0.18], "fraction").as_dict(),
                            end_to_end_fraction=0.537)
    row = format_summary_table({"t": build_report([train])}).splitlines()[2]
    assert row.endswith("wait 17.9% e2e 53.7%") and "278.0" in row


# ---- target verdicts at their thresholds ---------------------------------------------------

def verdicts(*runs: dict) -> dict:
    from tcore.bench.targets import check_targets

    return {c.name: c for c in check_targets({"r": {"runs": list(runs)}})}


def test_targets_pass_at_their_thresholds_and_miss_below():
    small = dict(arch="vit_small", attention="xformers", precision="bf16")
    slow = gpu_result("model", 100.0, 0.01, arch="vit_small", attention="math", precision="fp32")
    # MFU >= 35% (ViT-S) and >= 45% (ViT-B); bf16 >= 3x eager fp32 math; DALI GPU >= 2x the
    # ViT-S step; end to end >= 95%: exactly at each threshold passes.
    at = verdicts(gpu_result("model", 300.0, 0.35, **small), slow,
                  gpu_result("model", 100.0, 0.45, arch="vit_base", attention="xformers", precision="bf16"),
                  gpu_result("data", 600.0, loader="dali", data="s", threads=8),
                  gpu_result("train", 285.0, **small))
    assert at["MFU vit_small bf16 batch 64"].passed is True
    assert at["MFU vit_base bf16 batch 64"].passed is True
    assert at["vit_small best bf16 / eager fp32 math"].passed is True
    assert at["DALI GPU / ViT-S step samples/s"].passed is True
    assert at["end to end / model-only samples/s"].passed is True
    below = verdicts(gpu_result("model", 299.0, 0.349, **small), slow,
                     gpu_result("data", 597.0, loader="dali", data="s", threads=8),
                     gpu_result("train", 284.0, **small))
    assert below["MFU vit_small bf16 batch 64"].passed is False
    assert below["vit_small best bf16 / eager fp32 math"].passed is False
    assert below["DALI GPU / ViT-S step samples/s"].passed is False
    assert below["end to end / model-only samples/s"].passed is False
    # On the CPU, DALI >= 1.5x the baseline loader on the same data, threads and batch.
    cpu = dict(device="cuda", data="a", threads=2, batch=8)
    for dali, passed in ((15.0, True), (14.9, False)):
        runs = [gpu_result("data", dali, loader="dali", **cpu),
                gpu_result("data", 10.0, loader="baseline", **cpu)]
        for run in runs:
            run["environment"] = {"device": "cpu", "device_name": "test cpu"}
        assert verdicts(*runs)["DALI CPU / baseline loader samples/s"].passed is passed
    # ... for the full set of views: a pair on smaller views is left out, saying why.
    small_views = [gpu_result("data", 40.0, loader=loader, **cpu) for loader in ("dali", "baseline")]
    for run in small_views:
        run["environment"] = {"device": "cpu", "device_name": "test cpu"}
        run["details"]["views"] = {"global_size": 112, "local_size": 48, "n_local": 8}
    check = verdicts(*small_views)["DALI CPU / baseline loader samples/s"]
    assert check.passed is None and len(check.left_out) == 2
    assert all("global_size 112 (target 224); local_size 48 (target 96)" in why
               for why in check.left_out)


def test_targets_leave_out_runs_that_did_other_work():
    small = dict(arch="vit_small", attention="xformers", precision="bf16")
    # Batch 32, a CPU run and another GPU's run would all pass the MFU target: none counts.
    small_batch = gpu_result("model", 900.0, 0.9, **{**small, "batch": 32})
    on_cpu = gpu_result("model", 900.0, 0.9, **small)
    on_cpu["environment"] = {"device": "cpu", "device_name": "test cpu"}
    repeats = gpu_result("model", 300.0, 0.30, **small)
    repeats["figures"]["mfu"].update(min=0.2, max=0.5)    # the median over repeats counts
    checks = verdicts(small_batch, on_cpu, repeats)
    mfu = checks["MFU vit_small bf16 batch 64"]
    assert mfu.passed is False and mfu.measured == "30.0%"
    assert any("batch 32 (target 64)" in why for why in mfu.left_out)
    # The slow side of the speedup is eager fp32 *math* attention on the same GPU.
    fast = gpu_result("model", 400.0, 0.4, **small)
    sdpa32 = gpu_result("model", 200.0, 0.1, arch="vit_small", attention="sdpa", precision="fp32")
    other_gpu = gpu_result("model", 50.0, 0.02, arch="vit_small", attention="math", precision="fp32")
    other_gpu["environment"] = {"device": "cuda", "device_name": "another gpu"}
    compiled = gpu_result("model", 80.0, 0.03, arch="vit_small", attention="math", precision="fp32",
                          compile=True)
    assert verdicts(fast, sdpa32, other_gpu, compiled)[
        "vit_small best bf16 / eager fp32 math"].passed is None
    # "auto" counts as what it resolved to (precision auto -> bf16 on this GPU).
    auto = gpu_result("model", 300.0, 0.40, arch="vit_small", attention="xformers", precision="auto")
    auto["details"] = {"precision_resolved": "bf16"}
    assert verdicts(auto)["MFU vit_small bf16 batch 64"].measured == "40.0%"
    # End to end pairs a train run only with the model run of the same step settings.
    train = gpu_result("train", 390.0, **small)
    other_step = gpu_result("model", 400.0, 0.4, arch="vit_small", attention="sdpa", precision="bf16")
    assert verdicts(train, other_step)["end to end / model-only samples/s"].passed is None
    # ... unless the train run timed its own step alone (bench train's end_to_end_fraction):
    # that figure is the verdict, with or without a model run beside it.
    for fraction, passed in ((0.95, True), (0.89, False)):
        timed_alone = gpu_result("train", 390.0, **small)
        timed_alone["figures"]["end_to_end_fraction"] = fraction
        check = verdicts(timed_alone, fast)["end to end / model-only samples/s"]
        assert (check.passed, check.measured) == (passed, f"{fraction:.1%}")
        assert "its own model-only steps" in check.basis


def test_bench_train_figures_follow_from_the_timed_windows(synth_shards, monkeypatch):
    """Warm-up untimed, the wait is next() alone, each window ends with a device sync:
    step time, samples/s, data wait and its fraction per window, on a clock moved by the
    real loader's batches and the real steps by known amounts."""
    from tcore.bench import run_bench
    from tcore.bench import train as bench_train
    from tcore.train import Trainer

    clock = FakeClock(tick=2.0**-20)
    monkeypatch.setattr(bench_train, "time", clock)
    monkeypatch.setattr(bench_train, "synchronizer", lambda device: lambda: clock.advance(0.25))
    real_step, costs, built, build = Trainer.step, [], [], bench_train.build_named_loader

    def step(self, it, batch):
        clock.advance(costs.pop(0))
        return real_step(self, it, batch)

    def counted_loader(*args, **kwargs):
        # Warm-up: --warmup 1 is raised to the loader's prefetch + 1 steps (the batches
        # queued before the first step), each costing 50 s in next() and 100 s in the step.
        # Then a batch (9 s) held for the model-only steps before: as many untimed steps as
        # the warm-up (100 s each) and one per window (0.4 s each); the warm-up again; the
        # two timed steps; one more batch (7 s) held for the model-only steps after: one
        # untimed (100 s) and one per window (0.5 s each).
        loader = build(*args, **kwargs)
        warm = loader.prefetch + 1
        costs.extend([100.0] * warm + [100.0] * warm + [0.4, 0.4] + [100.0] * warm
                     + [1.0, 2.0] + [100.0, 0.5, 0.5])
        built.append(CountingLoader(loader, clock, [50.0] * warm + [9.0] + [50.0] * warm
                                    + [0.5, 1.5] + [7.0]))
        return built[-1]

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(bench_train, "build_named_loader", counted_loader)
    settings = bench_train.TrainBenchSettings(
        data=str(synth_shards), arch="vit_tiny", batch=2, precision="fp32", device="cpu",
        threads=1, warmup=1, steps=2, repeats=2, overrides=TINY_VIEWS)
    run = run_bench("train", settings)["runs"][0]
    warm = run["details"]["warmup_steps"]
    assert warm == built[0].prefetch + 1 > 1 and built[0].drawn == 2 * warm + 4
    assert costs == []
    figures = run["figures"]

    def extremes(name):
        return [figures[name]["min"], figures[name]["max"]]

    # Window 1: wait 0.5 + step 1 + sync 0.25; window 2: 1.5 + 2 + 0.25 (one step each).
    # (1e-3: each clock read moves the fake clock by a growing tick)
    assert extremes("step_time") == pytest.approx([1.75, 3.75], abs=1e-3)
    assert extremes("data_wait") == pytest.approx([0.5, 1.5], abs=1e-3)
    assert extremes("samples_per_s") == pytest.approx([2 / 3.75, 2 / 1.75], rel=1e-3)
    # Two windows: samples/s x step time = batch for the medians too (the mean of the two
    # windows' rates would be 15% above 2 / the median step time here).
    assert figures["samples_per_s"]["median"] * figures["step_time"]["median"] == \
        pytest.approx(2, rel=1e-12)
    assert extremes("data_wait_fraction") == pytest.approx([0.5 / 1.75, 1.5 / 3.75], rel=1e-3)
    assert run["details"]["steps"] == 2 and run["details"]["samples"] == 4
    # Each step's host time, next() and step together (the window's sync not in it).
    assert run["details"]["step_host_ms"] == pytest.approx([1500, 3500], abs=1)
    # The wait left out of each window: step 1 + sync 0.25, step 2 + sync 0.25.
    assert extremes("step_time_without_wait") == pytest.approx([1.25, 2.25], abs=1e-3)
    # Model only: the held batches' fetches (9 s, 7 s) and their untimed steps are outside
    # every window; each window is step 0.4 (before) or 0.5 (after) + sync 0.25.
    assert run["details"]["model_only_steps"] == 2
    # (rel 1e-3: each clock read moves the fake clock by a growing tick)
    assert extremes("model_only_samples_per_s") == pytest.approx([2 / 0.75, 2 / 0.75], rel=1e-3)
    assert extremes("model_only_before_samples_per_s") == pytest.approx([2 / 0.65, 2 / 0.65],
                                                                        rel=1e-3)
    # Against the faster of the two model-only phases, here the one before: the ratio of
    # the median step times.
    assert figures["end_to_end_fraction"] == pytest.approx(
        figures["samples_per_s"]["median"] / (2 / 0.65), rel=1e-3)
    assert figures["end_to_end_fraction"] == pytest.approx(0.65 / 2.75, rel=1e-3)
    # Each window's rate in the order run (the slow second window second), and each
    # model-only step's host time.
    assert run["details"]["window_samples_per_s"] == {
        "end_to_end": [pytest.approx(2 / 1.75, abs=0.05), pytest.approx(2 / 3.75, abs=0.05)],
        "model_only": [pytest.approx(2 / 0.75, abs=0.05)] * 2,
        "model_only_before": [pytest.approx(2 / 0.65, abs=0.05)] * 2}
    assert run["details"]["model_only_step_host_ms"] == pytest.approx([500, 500], abs=1)
    assert run["details"]["model_only_before_step_host_ms"] == pytest.approx([400, 400],
                                                                             abs=1)


def test_an_mfu_above_one_is_flagged_not_reported_silently(monkeypatch):
    """A peak measured while other work slowed the matmul (here: a peak of 1 MFLOP/s) puts
    MFU above 100%; the run says so in its warnings, which the terminal prints."""
    from tcore.bench import model as bench_model
    from tcore.bench import run_bench

    slow_peak = {"flops_per_s": 1e6, "median_flops_per_s": 1e6, "size": 32, "dtype": "float32",
                 "repeats": 1, "iterations": 1}
    monkeypatch.setattr(bench_model, "measured_peak", lambda *args: slow_peak)
    settings = bench_model.ModelBenchSettings(
        arch="vit_tiny", batch=1, precision="fp32", device="cpu", n_local=1, global_size=32,
        local_size=32, warmup=0, repeats=1, steps=1, peak_size=32,
        overrides="model.head.prototypes=64,model.head.hidden=64")
    run = run_bench("model", settings)["runs"][0]
    assert run["figures"]["mfu"]["max"] > 1.0
    assert any(w.startswith("MFU above 100%") and "idle machine" in w for w in run["warnings"])


def test_bench_commands_hand_every_option_to_the_settings(monkeypatch, tmp_path):
    """What each option sets is what runs, and so what the report's settings say."""
    import tcore.bench as bench_api

    calls = []

    def record(kind, settings, compare=None, json_path=None, profile_dir=None):
        calls.append((kind, settings, compare, json_path, profile_dir))
        return build_report([fake_result(1.0, "sdpa")])

    monkeypatch.setattr(bench_api, "run_bench", record)
    run_cli(["bench", "model", "--arch", "vit_base", "--batch", "3", "--attention", "math",
             "--precision", "fp16", "--compile", "--device", "cpu", "--local-crops", "2",
             "--global-size", "48", "--local-size", "32", "--warmup", "4", "--repeats", "6",
             "--steps", "7", "--peak-size", "128", "--set", "model.head.hidden=64",
             "--compare", "batch=5", "--json", str(tmp_path / "m.json"),
             "--profile", str(tmp_path / "p")])
    run_cli(["bench", "train", "--data", str(tmp_path), "--loader", "baseline", "--arch", "vit_tiny",
             "--batch", "5", "--attention", "sdpa", "--precision", "bf16", "--device", "cpu",
             "--threads", "3", "--warmup", "2", "--steps", "9", "--repeats", "3",
             "--set", "model.head.hidden=64"])
    run_cli(["bench", "data", "--data", str(tmp_path), "--loader", "baseline", "--device", "cpu",
             "--threads", "3", "--batch", "5", "--seconds", "2.5", "--warmup", "4",
             "--repeats", "6", "--set", "views.n_local=2"])
    (kind, model, compare, json_path, profile), train, data = calls
    assert (kind, compare, json_path, profile) == ("model", "batch=5", str(tmp_path / "m.json"),
                                                   str(tmp_path / "p"))
    assert {k: getattr(model, k) for k in (
        "arch", "batch", "attention", "precision", "compile", "device", "n_local", "global_size",
        "local_size", "warmup", "repeats", "steps", "peak_size", "overrides")} == dict(
        arch="vit_base", batch=3, attention="math", precision="fp16", compile=True, device="cpu",
        n_local=2, global_size=48, local_size=32, warmup=4, repeats=6, steps=7, peak_size=128,
        overrides="model.head.hidden=64")
    assert train[0] == "train" and {k: getattr(train[1], k) for k in (
        "data", "loader", "arch", "batch", "attention", "precision", "compile", "device", "threads",
        "warmup", "steps", "repeats", "overrides")} == dict(
        data=str(tmp_path), loader="baseline", arch="vit_tiny", batch=5, attention="sdpa",
        precision="bf16", compile=False, device="cpu", threads=3, warmup=2, steps=9, repeats=3,
        overrides="model.head.hidden=64")
    assert data[0] == "data" and {k: getattr(data[1], k) for k in (
        "data", "loader", "device", "threads", "batch", "seconds", "warmup_batches", "repeats",
        "overrides")} == dict(data=str(tmp_path), loader="baseline", device="cpu", threads=3,
                              batch=5, seconds=2.5, warmup_batches=4, repeats=6,
                              overrides="views.n_local=2")


def test_cpu_peak_memory_is_not_an_earlier_runs_peak():
    from tcore.bench.model import cpu_peak_rss, peak_memory

    cpu = torch.device("cpu")
    # The process's peak RSS only grows: if it has not grown since the run began, the run's
    # own peak is hidden under an earlier one and is not reported as if it were measured.
    # Here an earlier run peaked 1 MiB above anything since.
    assert peak_memory(cpu, cpu_peak_rss() + 2**20) == (None, "not measured")
    before = cpu_peak_rss() - 2**20          # this run grew the peak by a MiB
    grown, kind = peak_memory(cpu, before)
    assert kind == "process_max_rss" and before < grown <= cpu_peak_rss()
    assert peak_memory(cpu, None)[1] == "process_max_rss"


def test_bench_data_stage_a_alone_times_the_dali_loaders_own_batches(synth_shards, tmp_path):
    """`--loader stage-a` runs the DALI loader's stage A with the same settings: the same
    samples and frame draws, batch after batch, and no stage B (nothing decoded)."""
    from tcore.bench.data import build_named_loader, close_loader

    alone, dali = (build_named_loader(kind, str(synth_shards), torch.device("cpu"), 1, 2, 3)
                   for kind in ("stage-a", "dali"))
    try:
        for _ in range(5):
            mine, theirs = next(alone), next(dali)
            assert torch.equal(mine["labels"], theirs["labels"])
            assert torch.equal(mine["frame_indices"], theirs["frame_indices"])
    finally:
        close_loader(alone)
        close_loader(dali)
    path = tmp_path / "stage_a.json"
    output = run_cli(["bench", "data", "--data", str(synth_shards), "--loader", "stage-a",
                      "--batch", "2", "--seconds", "0.5", "--warmup", "1", "--repeats", "2",
                      "--json", str(path)])
    assert "loader=stage-a" in output
    (run,) = json.loads(path.read_text())["runs"]
    assert run["details"]["samples"] == 2 * run["details"]["batches"] >= 4
    assert run["figures"]["samples_per_s"]["median"] > 0
    assert "next_ms_per_batch" not in run["details"]       # no stage B behind it


def test_timeline_counts_device_time_once_and_per_stream():
    """The profile's timeline: overlapping work on one stream counted once, work on two
    streams at once counted once in the device's busy time and again as overlap, and the
    host's blocking and launch calls summed by name."""
    from tcore.bench.timeline import Activity, format_timeline, timeline_summary, union_us

    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_us([]) == 0
    work = [Activity("gemm", 0, 40_000, stream=7), Activity("gelu", 30_000, 50_000, stream=7),
            Activity("colour", 45_000, 60_000, stream=13),
            Activity("cudaLaunchKernel", 0, 10), Activity("cudaLaunchKernel", 20, 40),
            Activity("cudaStreamSynchronize", 60_000, 61_000)]
    summary = timeline_summary(work, wall_us=100_000, steps=2)
    assert summary["device_busy_ms"] == pytest.approx(60.0)
    assert summary["device_busy_fraction"] == pytest.approx(0.6)
    assert summary["streams"] == {
        7: {"busy_ms": pytest.approx(50.0), "activities": 2,
            "kernels": [{"name": "gemm", "ms": pytest.approx(40.0), "calls": 1},
                        {"name": "gelu", "ms": pytest.approx(20.0), "calls": 1}]},
        13: {"busy_ms": pytest.approx(15.0), "activities": 1,
             "kernels": [{"name": "colour", "ms": pytest.approx(15.0), "calls": 1}]}}
    assert summary["overlap_ms"] == pytest.approx(5.0)
    assert summary["blocking"] == {"cudaStreamSynchronize": {"calls": 1, "ms": pytest.approx(1.0)}}
    assert summary["launches"] == {"cudaLaunchKernel": {"calls": 2, "ms": pytest.approx(0.03)}}
    text = format_timeline(summary)
    assert "2 steps in 100.0 ms of wall time (50.0 ms a step)" in text
    assert "device busy 60.0 ms (60.0% of the wall time), idle 40.0 ms" in text
    # the busiest stream first
    assert text.index("stream    7") < text.index("stream   13")
    assert "cudaStreamSynchronize 1 x, 1.0 ms" in text
    assert "40.00 ms      1 x  gemm" in text and "15.00 ms      1 x  colour" in text
    # three streams busy at once: the shared time counted once, not once per extra stream
    three = [Activity("a", 0, 10_000, stream=1), Activity("b", 0, 10_000, stream=2),
             Activity("c", 5_000, 10_000, stream=3), Activity("d", 20_000, 30_000, stream=3)]
    summary = timeline_summary(three, wall_us=40_000, steps=1)
    assert summary["device_busy_ms"] == pytest.approx(20.0)
    assert summary["overlap_ms"] == pytest.approx(10.0)


def test_timeline_lists_each_busy_streams_top_kernels_and_sums_the_small_streams():
    """Per stream the kernels with the most device time (summed over their calls, the most
    first, at most TOP_KERNELS), printed for the busiest streams; streams under 1% of the
    busy time get no kernel list and share one line."""
    from tcore.bench.timeline import TOP_KERNELS, Activity, format_timeline, timeline_summary

    work = [Activity(f"k{i}", 1000 * i, 1000 * i + 10 * (i + 1), stream=7) for i in range(12)]
    work += [Activity("k0", 20_000, 20_500, stream=7)]             # k0 again: 10 + 500 us
    work += [Activity("blur_pass", 30_000, 40_000, stream=533)]
    work += [Activity("dali", 50_000 + 10 * s, 50_001 + 10 * s, stream=s) for s in range(40, 50)]
    summary = timeline_summary(work, wall_us=100_000, steps=1)
    kernels = summary["streams"][7]["kernels"]
    assert len(kernels) == TOP_KERNELS
    assert kernels[0] == {"name": "k0", "ms": pytest.approx(0.51), "calls": 2}
    assert [k["name"] for k in kernels[1:]] == [f"k{i}" for i in range(11, 4, -1)]
    assert all("kernels" not in summary["streams"][s] for s in range(40, 50))
    text = format_timeline(summary)
    assert text.index("stream  533") < text.index("blur_pass") < text.index("stream    7")
    assert "10 more streams, each under 1% of the busy time: busy 0.0 ms together, 10 " in text
    assert "stream   40" not in text
