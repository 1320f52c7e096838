"""`tcore bench`: one entry point over the model, data and train benches.

`run_bench(kind, settings, compare=...)` runs one configuration and, with `compare`, a second
one in the same process (same warm device, same libraries), then builds the report with the
ratio of their samples/s. The modules behind it:

- `tcore.bench.stats`: warm-up/repeat timing, median, spread, percentiles;
- `tcore.bench.flops`: FLOP counting, the measured matmul peak, MFU;
- `tcore.bench.model`, `tcore.bench.data`, `tcore.bench.train`: the three benches;
- `tcore.bench.report`: environment record, JSON files, terminal tables.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, replace

import torch

from tcore.bench.data import DataBenchSettings, run_data_bench
from tcore.bench.model import ModelBenchSettings, attention_agreement, run_model_bench
from tcore.bench.report import (build_report, format_report, format_summary_table,
                                parse_overrides, read_report, report_names, resolve_device,
                                split_overrides, write_json_atomic)
from tcore.bench.targets import format_targets
from tcore.bench.train import TrainBenchSettings, run_train_bench
from tcore.preprocess.files import make_output_directory, make_output_file_directory

SETTINGS = {"model": ModelBenchSettings, "data": DataBenchSettings, "train": TrainBenchSettings}


def run_one(kind: str, settings, profile_dir: str | None = None) -> dict:
    if kind == "model":
        return run_model_bench(settings, profile_dir=profile_dir)
    if kind == "data":
        return run_data_bench(settings)
    if kind == "train":
        return run_train_bench(settings, profile_dir=profile_dir)
    raise ValueError(f"unknown bench kind {kind!r}; choose from {sorted(SETTINGS)}")


def release_device_memory() -> None:
    """Free the first run's model and caches so the second run starts from the same state."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(kind: str, settings, compare: str | None = None, json_path: str | None = None,
              profile_dir: str | None = None) -> dict:
    """Run `settings` (and `compare` overrides of it, if given); write and return the report.
    A second run that fails raises CompareFailed, the first run's report written first."""
    # All that can be refused is refused before the first run (minutes), not after it: both
    # runs' settings and devices, and the paths the report and the profile go to.
    settings.validate()
    first = runs_as(settings)      # the device, and a precision it can run
    second = second_settings(settings, compare, first) if compare is not None else None
    if json_path:
        make_output_file_directory(json_path, f"--json {json_path}")
    if profile_dir:
        make_output_directory(profile_dir, f"--profile {profile_dir}")
    runs = [run_one(kind, settings, profile_dir)]
    if second is not None:
        release_device_memory()
        try:
            runs.append(run_one(kind, second))
        except Exception as error:   # out of memory, bad data, a bug: the first run stands
            report = build_report(runs, {"compare": compare,
                                         "error": f"{type(error).__name__}: {error}"})
            written = None
            if json_path:
                try:
                    write_json_atomic(json_path, report)
                    written = json_path
                except OSError:     # the first run's table is still printed
                    pass
            raise CompareFailed(report, written) from error
    report = build_report(runs)
    if json_path:
        write_json_atomic(json_path, report)
    return report


class CompareFailed(Exception):
    """The second run of a --compare failed after the first completed. `report` holds the
    first run and `compare_failed` (the --compare settings, the error), and is already in
    `json_path` if one was given; the error is the exception's cause."""

    def __init__(self, report: dict, json_path: str | None):
        self.report, self.json_path = report, json_path
        failed = report["compare_failed"]
        super().__init__(f"the second run ({failed['compare']}) failed after the first "
                         f"completed: {failed['error']}")


def second_settings(settings, compare: str, first_runs_as: dict):
    """The --compare run's settings, validated (its device too) as the first run's are;
    `first_runs_as` is `runs_as(settings)`."""
    if not split_overrides(compare):
        raise ValueError(f"--compare {compare!r} names no setting: give KEY=VALUE[,KEY=VALUE], "
                         "or leave --compare out for one run")
    changed = changed_settings(settings, compare)
    if not changed:
        raise ValueError(f"--compare {compare!r} changes no setting: both runs would be the same")
    try:
        second = replace(settings, **changed).validate()
        second_runs_as = runs_as(second)     # its device too
    except ValueError as error:
        raise ValueError(f"--compare {compare!r}: {error}") from None
    if second_runs_as == first_runs_as:
        same = "; ".join(f"{key} {getattr(settings, key)} and {value} both run as "
                         f"{first_runs_as[key]}" for key, value in changed.items())
        raise ValueError(f"--compare {compare!r} changes no setting on this device: {same} "
                         "here, so both runs would be the same")
    return second


def runs_as(settings) -> dict:
    """The settings as they run on their device, for telling two runs apart: the device
    (`auto` is the CPU without a GPU), `precision=auto` (fp32 on the CPU, bf16 or fp16 on a
    GPU) and the attention backend (`auto` and `xformers` are SDPA where xFormers cannot
    run) resolved. The report keeps the names as given and shows what they ran as."""
    from tcore.bench.model import resolved_attention
    from tcore.config import ConfigError
    from tcore.train import resolve_precision

    values = asdict(settings)
    device = resolve_device(settings.device)
    values["device"] = str(device)
    if "attention" in values:
        values["attention"] = resolved_attention(values["attention"], device)
    if "precision" in values:
        try:
            values["precision"] = resolve_precision(values["precision"], device)
        except ConfigError:   # its advice is tcore train's; say it in the bench's terms
            raise ValueError(f"precision {values['precision']} needs a GPU; on {device} use "
                             "fp32 or bf16") from None
    return values


def changed_settings(settings, compare: str) -> dict:
    """Only the keys `compare` changes (parsed and type-checked against `settings`)."""
    current = asdict(settings)
    updated = parse_overrides(compare, current)
    return {key: value for key, value in updated.items() if current[key] != value}


def run_data_loaders(settings: DataBenchSettings, loader: str, compare: str | None = None,
                     json_path: str | None = None) -> dict:
    """`bench data --loader dali|baseline|both|stage-a`: 'both' is DALI compared with the
    baseline."""
    if loader == "both":
        if compare is not None:
            raise ValueError("--loader both already compares two runs; drop --compare")
        compare = "loader=baseline"
        loader = "dali"
    return run_bench("data", replace(settings, loader=loader), compare, json_path)


def summary_table(paths: list[str], targets: bool = False) -> str:
    """One table over many report files (what `scripts/gpu_check.sh` prints at its end),
    optionally followed by the project's performance targets checked against them."""
    # Keyed by path (shown as short as tells them apart): same-named files in two
    # directories are two reports, not one.
    reports = {name: read_report(path) for path, name in report_names(paths).items()}
    text = format_summary_table(reports)
    if targets:
        text += "\n" + format_targets(reports)
    return text


__all__ = ["run_bench", "run_data_loaders", "CompareFailed", "summary_table",
           "attention_agreement", "format_report", "ModelBenchSettings", "DataBenchSettings",
           "TrainBenchSettings"]
