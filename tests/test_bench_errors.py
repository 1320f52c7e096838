"""`tcore bench` stays honest: checks that catch a wrong attention, targets that count only
runs that did the target's work, and bad input refused up front with the option named.

Real runs at tiny sizes on the CPU (vit_tiny, 64-px crops, a small head); a bad value must
fail before the first run, which a `--profile` directory left empty shows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from tcore.bench.report import parse_overrides
from tcore.cli import main

HEAD = "model.head.prototypes=256,model.head.hidden=128"


def tiny(batch: int = 2, overrides: str = HEAD) -> list[str]:
    return ["--arch", "vit_tiny", "--batch", str(batch), "--device", "cpu", "--precision", "fp32",
            "--global-size", "64", "--local-size", "32", "--local-crops", "1", "--warmup", "0",
            "--repeats", "1", "--steps", "1", "--peak-size", "64", "--set", overrides]


TINY = tiny()
AGREE = ["bench", "agree", "--arch", "vit_tiny", "--attention", "math", "--reference", "sdpa",
         "--precision", "fp32", "--device", "cpu", "--batch", "1"]


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def refused(result, *named: str) -> str:
    """A clean click error (no traceback) naming every string in `named`."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    assert "Error" in result.output, result.output
    for text in named:
        assert text in result.output, (text, result.output)
    return result.output


# ---- 1. bench agree sees attention ----------------------------------------------------------

def no_scale(q, k, v, dropout_p=0.0):
    """Attention without the 1/sqrt(d) scale."""
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def ignores_q_and_k(q, k, v, dropout_p=0.0):
    """Uniform weights: every token gets the mean of v."""
    return v.mean(dim=-2, keepdim=True).expand_as(v)


def test_agree_tells_a_broken_attention_backend_from_a_correct_one(monkeypatch, tmp_path):
    path = tmp_path / "agree.json"
    result = invoke([*AGREE, "--json", str(path)])
    assert result.exit_code == 0 and "AGREE" in result.output, result.output
    report = json.loads(path.read_text())
    differences = report["differences"]
    # What was asked for, as the other reports keep it.
    assert report["settings"] == {"arch": "vit_tiny", "attention": "math", "reference": "sdpa",
                                  "precision": "fp32", "device": "cpu", "batch": 1,
                                  "tolerance": 0.02}
    assert set(differences) == {"cls", "patch", "attention"}
    assert max(d["max_rel"] for d in differences.values()) < 1e-4
    # The `math` backend replaced by a wrong function, as the backbone selects backends.
    from tcore.models import attention

    for broken in (no_scale, ignores_q_and_k):
        monkeypatch.setattr(attention, "math_attention", broken)
        result = invoke([*AGREE, "--json", str(path)])
        assert result.exit_code == 1 and "DISAGREE" in result.output, (broken, result.output)
        assert json.loads(path.read_text())["differences"]["attention"]["max_rel"] > 0.02



@pytest.mark.parametrize("tolerance", ["0", "-1"])
def test_agree_tolerance_must_be_positive(tolerance):
    # a DISAGREE with exit status 1 before
    result = invoke([*AGREE, "--tolerance", tolerance])
    assert result.exit_code == 2 and "--tolerance" in result.output, result.output


def test_agree_refuses_two_names_for_one_backend():
    # On the CPU xFormers falls back to SDPA: "xformers vs sdpa" would compare SDPA with itself.
    result = invoke(["bench", "agree", "--arch", "vit_tiny", "--attention", "xformers",
                     "--reference", "sdpa", "--precision", "fp32", "--device", "cpu",
                     "--batch", "1"])
    assert result.exit_code != 0 and "AGREE" not in result.output, result.output
    assert "xformers vs sdpa: both run as sdpa on cpu here" in result.output

# ---- 2. targets --------------------------------------------------------------------------

def run_record(kind: str, samples_per_s: float, device: str = "cuda", mfu: float | None = None,
               warnings=(), **settings) -> dict:
    figures = {"samples_per_s": {"median": samples_per_s}}
    if mfu is not None:
        figures["mfu"] = {"median": mfu}
    base = {"batch": 64, "overrides": ""}
    if kind == "model":
        base.update(compile=False, global_size=224, local_size=96, n_local=8)
    return {"kind": kind, "settings": {**base, **settings}, "figures": figures,
            "environment": {"device": device, "device_name": f"test {device}"},
            "details": {}, "warnings": list(warnings)}


def write_reports(directory: Path, reports: dict[str, list[dict]]) -> list[str]:
    paths = []
    for name, runs in reports.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps({"format_version": 1, "runs": runs}))
        paths.append(str(path))
    return paths


def target_lines(output: str, name: str) -> list[str]:
    """The check's line and its `left out:` lines."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(name))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.strip().startswith("left out:"):
            break
        block.append(line)
    return block


def test_targets_count_only_runs_that_did_the_target_work(tmp_path):
    small = dict(arch="vit_small", attention="xformers", precision="bf16")
    cpu_data = dict(device="cpu", threads=1, batch=2)
    paths = write_reports(tmp_path, {
        # Shrunk to 64 px and a smaller head: far above target, but not the target's work.
        "shrunk": [run_record("model", 900.0, mfu=0.60, global_size=64, local_size=32, **small),
                   run_record("model", 900.0, mfu=0.60, overrides="model.head.prototypes=256",
                              **small)],
        # Three full-size runs of one configuration: the median (31%) counts, not the best.
        "full": [run_record("model", 300.0, mfu=0.30, **small),
                 run_record("model", 500.0, mfu=0.50, **small)],
        "full2": [run_record("model", 310.0, mfu=0.31, **small)],
        # A DALI run on smaller views (not the target's work) against a baseline with the
        # exact jitter: not a pair.
        "unfair": [run_record("data", 54.0, loader="dali", data="s",
                              overrides="views.global_size=112,views.n_local=2", **cpu_data),
                   run_record("data", 16.6, loader="baseline", data="s",
                              overrides="views.color_jitter=torchvision", **cpu_data)],
        # Same-work pairs (one per shard set): 1.2x, 1.3x and a lucky 4x; median 1.3x.
        "pairs": [run_record("data", 12.0, loader="dali", data="a", **cpu_data),
                  run_record("data", 10.0, loader="baseline", data="a", **cpu_data),
                  run_record("data", 13.0, loader="dali", data="b", **cpu_data),
                  run_record("data", 10.0, loader="baseline", data="b", **cpu_data),
                  run_record("data", 40.0, loader="dali", data="c", **cpu_data),
                  run_record("data", 10.0, loader="baseline", data="c", **cpu_data)],
        # A pair whose DALI run was flagged (too few batches timed).
        "flagged": [run_record("data", 90.0, loader="dali", data="d",
                               warnings=["only 3 batches were timed"], **cpu_data),
                    run_record("data", 10.0, loader="baseline", data="d", **cpu_data)],
    })
    result = invoke(["bench", "table", "--targets", *paths])
    assert result.exit_code == 0, result.output
    mfu = target_lines(result.output, "MFU vit_small")
    assert "31.0%" in mfu[0] and "MISS" in mfu[0] and "median of 3 runs" in mfu[0], mfu
    assert any("shrunk run 1" in line and "global_size 64 (target 224)" in line for line in mfu)
    assert any("shrunk run 2" in line and "model.head.prototypes=256" in line for line in mfu)
    cpu = target_lines(result.output, "DALI CPU / baseline")
    assert "1.30x" in cpu[0] and "MISS" in cpu[0] and "median of 3 pairs" in cpu[0], cpu
    # The DALI side did not make the full set of views; its baseline then has no partner.
    assert any("unfair run 1" in line and "global_size 112 (target 224); n_local 2 (target 8)"
               in line for line in cpu)
    assert any("unfair run 2" in line and "no run to pair" in line for line in cpu)
    assert any("flagged run 1" in line and "only 3 batches" in line for line in cpu)


# ---- 3. --compare is checked before the first run ------------------------------------------

@pytest.mark.parametrize("compare, named", [
    ("batch=0", "batch"), ("precision=fp8", "fp8"), ("global_size=8", "global_size"),
    ("n_local=-1", "n_local"), ("device=tpu", "tpu"), ("batch=two", "batch"),
    ("compile=maybe", "compile"), ("batch=2", "changes no setting"),
    ("overrides=model.nope=1", "model.nope"),
    # TINY runs fp32 on the CPU, which is what auto means there.
    ("precision=auto", "changes no setting on this device: precision fp32 and auto both run as fp32"),
    ("precision=fp16", "--compare 'precision=fp16': precision fp16 needs a GPU; on cpu use fp32"),
    # auto attention is SDPA where xFormers cannot run (the CPU); auto device is the CPU
    # without a GPU.
    *[pytest.param(compare, said, marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="what auto means on the CPU"))
      for compare, said in [
          ("attention=sdpa", "changes no setting on this device: attention auto and sdpa both "
                             "run as sdpa"),
          ("attention=xformers", "attention auto and xformers both run as sdpa"),
          ("device=auto", "changes no setting on this device: device cpu and auto both run as "
                          "cpu")]],
    ("overrides=model.drop_path=2.0", "model.drop_path must lie in [0, 1), got 2.0"),
    # '' was ignored (one run, exit status 0)
    ("", "--compare '' names no setting"), ("  ", "--compare '  ' names no setting"),
    # failed in the second run, after the first: DALI's or numpy's words
    ("seed=-1", "seed = -1: must be an integer from 0 to 2**31 - 1"),
])
def test_bad_compare_values_fail_before_the_first_run(tmp_path, compare, named):
    profile = tmp_path / "profile"   # the first run would write its profile here
    result = invoke(["bench", "model", *TINY, "--profile", str(profile), "--compare", compare])
    refused(result, "--compare", named)
    assert not (profile / "kernels.txt").exists()


def test_bench_train_compare_takes_only_the_loaders_train_runs(tmp_path):
    """stage-a (`bench data`'s) makes no views: refused before the first run, naming the
    loaders `bench train --loader` takes."""
    from tcore.bench.train import TRAIN_LOADERS
    from tcore.commands.bench import bench

    result = invoke(["bench", "train", "--data", str(tmp_path), "--arch", "vit_tiny",
                     "--device", "cpu", "--compare", "loader=stage-a"])
    refused(result, "--compare 'loader=stage-a'", "loader must be one of ('dali', 'baseline')")
    loader = next(p for p in bench.commands["train"].params if p.name == "loader")
    assert tuple(loader.type.choices) == TRAIN_LOADERS


def test_a_failed_second_run_keeps_the_first(synth_shards, tmp_path):
    """The second run of a --compare fails (here: its data has no manifest) after the first
    completed: the first run's figures are printed and written, marked, and the error says
    where they are."""
    empty, path = tmp_path / "empty", tmp_path / "out" / "data.json"
    empty.mkdir()
    result = invoke(["bench", "data", "--data", str(synth_shards), "--loader", "stage-a",
                     "--batch", "2", "--seconds", "0.2", "--warmup", "0", "--repeats", "1",
                     "--compare", f"data={empty}", "--json", str(path)])
    output = refused(result, f"the second run (data={empty}) failed after the first completed: "
                             "ShardDirError:", "manifest.json",
                     f"The first run's figures are above and in {path} (marked 'compare_failed')")
    assert "Traceback" not in output     # an error that names its cause
    assert output.index("[bench data] loader=stage-a") < output.index("Error:")
    assert "no ratio: the second run" in output
    report = json.loads(path.read_text())
    (run,) = report["runs"]
    assert run["settings"]["data"] == str(synth_shards)
    assert run["figures"]["samples_per_s"]["median"] > 0
    assert report["compare_failed"]["compare"] == f"data={empty}"
    assert report["compare_failed"]["error"].startswith("ShardDirError: ")
    assert "compare" not in report
    table = invoke(["bench", "table", str(path)])
    assert table.exit_code == 0 and "the second run failed" in table.output, table.output


def test_a_second_run_that_fails_unexpectedly_keeps_the_first_and_its_traceback(monkeypatch,
                                                                                tmp_path):
    """What cannot be made to fail on the CPU (a GPU out of memory): the second run raises,
    and its traceback is shown with the first run's figures."""
    import tcore.bench as bench_api

    real_run, calls = bench_api.run_one, []

    def second_fails(kind, settings, profile_dir=None):
        calls.append(settings.batch)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(kind, settings, profile_dir)

    monkeypatch.setattr(bench_api, "run_one", second_fails)
    result = invoke(["bench", "model", *TINY, "--compare", "batch=1"])
    output = refused(result, "the second run (batch=1) failed after the first completed: "
                             "RuntimeError: CUDA out of memory",
                     "The first run's figures are above", "Traceback", "second_fails")
    assert "[bench model] arch=vit_tiny batch=2" in output and calls == [2, 1]
    # A --json that cannot be written by then (here a folder took its place) does not hide
    # the first run's table behind its own error.
    report = tmp_path / "report.json"

    def second_fails_and_json_taken(kind, settings, profile_dir=None):
        if settings.batch == 1:
            report.mkdir()
        return second_fails(kind, settings, profile_dir)
    calls.clear()
    monkeypatch.setattr(bench_api, "run_one", second_fails_and_json_taken)
    result = invoke(["bench", "model", *TINY, "--compare", "batch=1", "--json", str(report)])
    output = refused(result, "the second run (batch=1) failed", "The first run's figures are "
                                                                 "above")
    assert "[bench model] arch=vit_tiny batch=2" in output and "marked" not in output


def test_compare_splits_items_as_set_does():
    settings = {"batch": 2, "overrides": ""}
    changed = parse_overrides("overrides=views.global_scale=[0.4,1.0],views.n_local=2,batch=4",
                              settings)
    assert changed == {"batch": 4, "overrides": "views.global_scale=[0.4,1.0],views.n_local=2"}


# ---- 4. output paths are checked before the run ---------------------------------------------

def test_json_and_profile_paths_are_checked_before_running(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for option in ("--json", "--profile"):
        target = str(afile / "x.json") if option == "--json" else str(afile / "prof")
        refused(invoke(["bench", "model", *TINY, option, target]), option, target)
    refused(invoke([*AGREE, "--json", str(afile / "x.json")]), "--json", str(afile / "x.json"))
    assert afile.read_text() == ""
    # A directory that cannot be written (a read-only one even for root): the user's path is
    # named, not a temporary file's.
    locked = Path("/sys/tcore-bench-probe.json")
    output = refused(invoke(["bench", "model", *TINY, "--json", str(locked)]), str(locked))
    assert ".tmp" not in output


# ---- 5. a second run's CPU peak memory is not the first's ------------------------------------

def test_second_cpu_run_does_not_repeat_the_first_runs_peak_memory(tmp_path):
    path = tmp_path / "m.json"
    result = invoke(["bench", "model", *tiny(batch=4), "--compare", "batch=1", "--json", str(path)])
    assert result.exit_code == 0, result.output
    first, second = json.loads(path.read_text())["runs"]
    assert first["settings"]["batch"] == 4 and second["settings"]["batch"] == 1
    peaks = [run["figures"]["peak_memory"] for run in (first, second)]
    # The process's peak RSS only grows: a smaller second run cannot show its own peak.
    assert peaks[1] is None or peaks[0] is None or peaks[1]["median"] > peaks[0]["median"]
    for run, peak in zip((first, second), peaks):
        if peak is None:
            assert any(w.startswith("peak_memory not measured") for w in run["warnings"])
    if peaks[1] is None:
        assert "peak_memory              not measured" in result.output


# ---- 6. bench table ---------------------------------------------------------------------

def test_table_keeps_same_named_reports_and_names_malformed_files(tmp_path):
    for name, rate in (("a", 11.0), ("b", 22.0)):
        (tmp_path / name).mkdir()
        write_reports(tmp_path / name, {"model": [run_record("model", rate, device="cpu",
                                                             arch="vit_tiny")]})
    result = invoke(["bench", "table", str(tmp_path / "a/model.json"), str(tmp_path / "b/model.json")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "model " in line and "vit_tiny" in line]
    assert len(rows) == 2 and rows[0].startswith("a/model") and rows[1].startswith("b/model")
    for content in ({"runs": [{}]}, {"differences": {}}, {"runs": []},
                    {"runs": [{"kind": "model", "settings": {}, "figures": {}, "environment": {}}]}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        refused(invoke(["bench", "table", str(bad)]), "bad.json")
        refused(invoke(["bench", "table", "--targets", str(bad)]), "bad.json")


# ---- 7. --set cannot change what the labels say ---------------------------------------------

@pytest.mark.parametrize("item, option", [("model.arch=vit_base", "--arch"),
                                          ("model.attention=math", "--attention"),
                                          ("train.precision=bf16", "--precision")])
def test_set_refuses_keys_that_options_set(tmp_path, item, option):
    args = tiny(overrides=f"{HEAD},{item}")
    refused(invoke(["bench", "model", *args, "--profile", str(tmp_path / "p")]), item, option)
    assert not (tmp_path / "p" / "kernels.txt").exists()


# ---- 8. help and option checks --------------------------------------------------------------

def test_bench_options_all_have_help_and_arch_lists_the_presets():
    from tcore.commands.bench import bench
    from tcore.models.vit import ARCHS

    for name in ("model", "data", "train", "agree"):
        command = bench.commands[name]
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"bench {name} {param.opts[0]} has no help"
        if name != "data":
            arch = next(p for p in command.params if p.name == "arch")
            assert sorted(arch.type.choices) == sorted(ARCHS)   # vit_large included
    refused(invoke(["bench", "model", "--arch", "vit_huge"]), "vit_huge", "vit_large")


def test_compare_help_examples_are_accepted_by_their_bench():
    from tcore.bench import DataBenchSettings, ModelBenchSettings, TrainBenchSettings
    from tcore.bench import changed_settings
    from tcore.commands.bench import bench

    for name, settings in (("model", ModelBenchSettings()), ("data", DataBenchSettings()),
                           ("train", TrainBenchSettings())):
        option = next(p for p in bench.commands[name].params if p.name == "compare")
        example = re.search(r"e\.g\. '([^']+)'", option.help).group(1)
        assert changed_settings(settings, example), (name, example)


def test_bench_train_refuses_fewer_steps_than_repeats(tmp_path):
    result = invoke(["bench", "train", "--data", str(tmp_path), "--arch", "vit_tiny",
                     "--device", "cpu", "--steps", "1", "--repeats", "3"])
    refused(result, "steps", "repeats")
    help_text = invoke(["bench", "train", "--help"]).output
    assert "IN ALL" in help_text
    assert "EACH repeat" in invoke(["bench", "model", "--help"]).output


def test_profile_help_says_a_compare_profiles_the_first_configuration_only():
    from tcore.commands.bench import bench

    for name in ("model", "train"):
        option = next(p for p in bench.commands[name].params if p.name == "profile_dir")
        assert "with --compare: of the first configuration only" in option.help, name

