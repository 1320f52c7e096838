"""Reporting for `tcore bench`: environment record, JSON files, terminal tables, --compare.

A result is a plain dict: {"kind", "settings", "figures": {name: Summary dict or scalar},
"environment"}. A report file holds the runs of one command (a second one with --compare)
and, with two runs, their ratios.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

from tcore.bench.stats import median
from tcore.pipelines.arguments import torch_device_name
from tcore.preprocess.files import write_text_atomically

# 2 (2026-11-29): rates (samples/s, MFU) and end_to_end_fraction summarised through their
# times (`tcore.bench.stats.summarize_rate`); 1 took the rates' own medians and quantiles.
REPORT_FORMAT_VERSION = 2
LIBRARIES = ("tcore", "torch", "torchvision", "timm", "nvidia-dali-cuda120", "nvidia-dali-cuda130",
             "xformers", "numpy", "av", "webdataset")
# The figure a --compare ratio is taken over, per bench kind (higher is better for all).
HEADLINE_FIGURE = {"model": "samples_per_s", "data": "samples_per_s", "train": "samples_per_s"}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model_name() -> str:
    """The CPU's model name as `lscpu` reports it (from /proc/cpuinfo), or the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """Everything needed to tell where and with what a figure was measured."""
    record = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda
        record["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return record


def resolve_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; 'gpu' is an alias of 'cuda' (as everywhere:
    `torch_device_name`)."""
    name = torch_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        # An explicit index: torch.cuda.set_device and DALI's device_id both need one.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def split_overrides(text: str) -> list[str]:
    """"a.b=1,c.d=2" -> ["a.b=1", "c.d=2"] (a comma inside [...] stays with its value)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def parse_overrides(text: str, settings: dict) -> dict:
    """`--compare 'attention=math,precision=fp32'` -> a copy of settings with those changed.

    Values are converted to the type the setting already has, so a typo or a bad value fails
    here with the key named rather than deep inside a run. Items split as `--set` splits them
    (a comma inside [...] stays with its value).
    """
    changed = dict(settings)
    previous = None
    for item in split_overrides(text):
        if "=" not in item:
            raise ValueError(f"--compare item {item!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        if previous == "overrides" and key not in settings:
            # 'overrides=a.b=1,c.d=2': config keys after `overrides=` continue its list.
            changed["overrides"] += "," + item
            continue
        previous = key
        if key not in settings:
            raise ValueError(f"--compare key {key!r} is not a setting of this bench; "
                             f"known: {', '.join(sorted(settings))}")
        changed[key] = convert_like(settings[key], value, key)
    return changed


def convert_like(current, value: str, key: str):
    if isinstance(current, bool):
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"--compare {key}={value!r}: expected a boolean")
        return lowered in ("true", "1", "yes", "on")
    for kind, name in ((int, "an integer"), (float, "a number")):
        if isinstance(current, kind):
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"--compare {key}={value!r}: expected {name}") from None
    if current is None and value.lower() == "none":
        return None
    return value


def headline(result: dict) -> float:
    figure = result["figures"][HEADLINE_FIGURE[result["kind"]]]
    return figure["median"] if isinstance(figure, dict) else float(figure)


def compare_ratio(first: dict, second: dict) -> dict:
    """Ratio of the headline figure (samples/s) of the first run over the second."""
    name = HEADLINE_FIGURE[first["kind"]]
    a, b = headline(first), headline(second)
    changed = {k: (first["settings"][k], second["settings"].get(k)) for k in first["settings"]
               if first["settings"][k] != second["settings"].get(k)}
    return {"figure": name, "ratio": a / b if b else float("inf"), "first": a, "second": b,
            "changed": changed}


def build_report(results: list[dict], compare_failed: dict | None = None) -> dict:
    """The report of one run, or of a --compare's two with their ratio; `compare_failed`
    ({"compare", "error"}): the --compare's second run failed, and `results` holds the first."""
    report = {"format_version": REPORT_FORMAT_VERSION, "runs": results}
    if len(results) == 2:
        report["compare"] = compare_ratio(results[0], results[1])
    if compare_failed:
        report["compare_failed"] = compare_failed
    return report


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write the report as JSON under a temporary name, then rename it into place (an
    OutputWriteError naming `path` when the OS refuses)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    return write_text_atomically(path, text)


def read_report(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable tcore bench report ({error})") from error
    if not isinstance(report, dict) or not ("runs" in report or "differences" in report):
        raise ValueError(f"{path}: not a tcore bench report (no 'runs' or 'differences' key)")
    problem = report_problem(report)
    if problem:
        raise ValueError(f"{path}: not a valid tcore bench report ({problem})")
    return report


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_problem(report: dict) -> str:
    """What keeps `report` from being tabulated ("" when nothing): the fields the table and
    the targets read, so a truncated or hand-made file fails with its name, not a KeyError."""
    if "differences" in report:  # `tcore bench agree`
        differences = report["differences"]
        if not isinstance(differences, dict) or not differences:
            return "'differences' is empty"
        if not all(isinstance(d, dict) and is_number(d.get("max_rel"))
                   for d in differences.values()):
            return "a 'differences' entry has no numeric 'max_rel'"
        missing = [k for k in ("arch", "resolved", "precision") if k not in report]
        return f"no {', '.join(map(repr, missing))}" if missing else ""
    runs = report["runs"]
    if not isinstance(runs, list) or not runs:
        return "'runs' is not a non-empty list"
    for number, run in enumerate(runs, 1):
        if not isinstance(run, dict):
            return f"run {number} is not an object"
        if run.get("kind") not in HEADLINE_FIGURE:
            return f"run {number}: 'kind' is {run.get('kind')!r}, not one of {sorted(HEADLINE_FIGURE)}"
        for key in ("settings", "figures", "environment"):
            if not isinstance(run.get(key), dict):
                return f"run {number}: no {key!r} object"
        figure = run["figures"].get(HEADLINE_FIGURE[run["kind"]])
        if not (is_number(figure) or isinstance(figure, dict) and is_number(figure.get("median"))):
            return f"run {number}: no {HEADLINE_FIGURE[run['kind']]!r} figure"
    return ""


def report_names(paths: list[str]) -> dict[str, str]:
    """Path -> the name a table shows: the file's stem, with as many parent directories as
    tell apart files of the same stem (`a/model`, `b/model`)."""
    full = {path: Path(path).resolve().with_suffix("") for path in paths}
    for depth in range(1, max((len(p.parts) for p in full.values()), default=1) + 1):
        names = {path: "/".join(p.parts[-depth:]) for path, p in full.items()}
        if len(set(names.values())) == len(set(full.values())):
            return names
    return {path: str(p) for path, p in full.items()}


# ---- terminal output ---------------------------------------------------------------------

def format_value(value: float, unit: str = "") -> str:
    if unit == "bytes":
        return f"{value / 2**20:.0f} MiB"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "fraction":
        return f"{value * 100:.1f}%"
    if unit == "flops":
        return f"{value / 1e9:.2f} GFLOP"
    if unit == "flops_per_s":
        return f"{value / 1e12:.2f} TFLOP/s"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_figure(figure) -> str:
    if isinstance(figure, dict):
        text = format_value(figure["median"], figure.get("unit", ""))
        if figure.get("n", 1) > 1:
            text += f" ± {format_value(figure['spread'] / 2, figure.get('unit', ''))}"
        return text
    return str(figure)


def settings_label(settings: dict, keys: tuple[str, ...], details: dict | None = None) -> str:
    """"arch=vit_small batch=64 attention=auto->sdpa ...": resolved "auto" values are shown."""
    parts = []
    for key in keys:
        if settings.get(key) in (None, ""):
            continue
        value = settings[key]
        resolved = (details or {}).get(f"{key}_resolved")
        if resolved and resolved != value:
            value = f"{value}->{resolved}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


# `overrides` last and only when set: it is what tells a --compare pair's runs apart.
LABEL_KEYS = {
    "model": ("arch", "batch", "attention", "precision", "compile", "device", "overrides"),
    "data": ("loader", "device", "threads", "batch", "overrides"),
    "train": ("arch", "batch", "attention", "precision", "compile", "device", "loader",
              "threads", "overrides"),
}
TABLE_FIGURES = {
    "model": ("samples_per_s", "step_time", "mfu", "flops_per_sample", "peak_memory",
              "cpu_seconds_per_sample"),
    "data": ("samples_per_s", "batch_latency_p50", "batch_latency_p90", "batch_latency_p99",
             "cpu_seconds_per_sample"),
    "train": ("samples_per_s", "step_time", "data_wait_fraction", "step_time_without_wait",
              "model_only_samples_per_s", "model_only_before_samples_per_s",
              "end_to_end_fraction"),
}


def scalar_unit(name: str) -> str:
    """Unit of a figure stored as a plain number, from its name."""
    if "latency" in name or name.endswith("_seconds") or name.startswith("cpu_seconds"):
        return "s"
    if name.endswith("flops_per_s"):
        return "flops_per_s"
    if "flops" in name:
        return "flops"
    if name.endswith("fraction"):
        return "fraction"
    return ""


def result_rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for name in TABLE_FIGURES[result["kind"]]:
        figure = result["figures"].get(name)
        if isinstance(figure, dict):
            rows.append((name, format_figure(figure)))
        elif figure is not None:
            rows.append((name, format_value(float(figure), scalar_unit(name))))
        elif name in result["figures"]:  # recorded as not measured (a warning says why)
            rows.append((name, "not measured"))
    return rows


def loader_time_line(details: dict) -> str:
    """"stage_b_wait 12.1, assemble 3.4, feed_next 1.2 (next()); stage A 16.0": where the
    DALI loader's time went per batch, or "" when the run reported none. With batches made
    ahead (`assemble_ahead`) next() only waits for the loader's thread ("ahead_wait"), and
    the other parts are that thread's."""
    phases = dict(details.get("next_ms_per_batch") or {})
    if not phases:
        return ""
    stage_a = f"stage A {details.get('stage_a_ms_per_batch', 0.0):.1f}"
    waited = phases.pop("ahead_wait", None)
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in phases.items())
    if waited is None:
        return f"{parts} (next()); {stage_a}"
    return f"ahead_wait {waited:.1f} (next()); {parts} (the loader's thread); {stage_a}"


def step_host_line(details: dict) -> str:
    """"median 105.2, slowest 420.1 (step 9 of 40)": each timed train step's host time, so
    a stall inside a window shows; "" when the run has none."""
    times = details.get("step_host_ms")
    if not times:
        return ""
    slowest = max(range(len(times)), key=times.__getitem__)
    return (f"median {median(times):.1f}, slowest {times[slowest]:.1f} "
            f"(step {slowest + 1} of {len(times)})")


def format_report(report: dict) -> str:
    """The short terminal table: one block per run, then the --compare ratio."""
    lines = []
    for result in report["runs"]:
        kind = result["kind"]
        label = settings_label(result["settings"], LABEL_KEYS[kind], result.get("details"))
        lines.append(f"[bench {kind}] {label}"
                     f"  on {result['environment']['device_name']}")
        rows = result_rows(result)
        width = max([24] + [len(name) for name, _ in rows])   # the names in one column
        for name, text in rows:
            lines.append(f"  {name:<{width}} {text}")
        loader_line = loader_time_line(result.get("details", {}))
        if loader_line:
            lines.append(f"  {'loader ms / batch':<{width}} {loader_line}")
        host_line = step_host_line(result.get("details", {}))
        if host_line:
            lines.append(f"  {'step host ms':<{width}} {host_line}")
        for warning in result.get("warnings", []):
            lines.append(f"  warning: {warning}")
    if "compare" in report:
        compare = report["compare"]
        changed = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in compare["changed"].items())
        lines.append(f"ratio {compare['figure']} first/second = {compare['ratio']:.3f}"
                     f"  ({changed or 'same settings'})")
    if "compare_failed" in report:
        failed = report["compare_failed"]
        lines.append(f"no ratio: the second run ({failed['compare']}) failed: {failed['error']}")
    return "\n".join(lines)


def format_summary_table(reports: dict[str, dict]) -> str:
    """One line per run over many report files (what scripts/gpu_check.sh ends with)."""
    header = f"{'report':<28} {'kind':<6} {'settings':<58} {'samples/s':>12} {'extra':>18}"
    lines = [header, "-" * len(header)]
    for name, report in reports.items():
        if "differences" in report:  # a `tcore bench agree` result
            worst = max(d["max_rel"] for d in report["differences"].values())
            verdict = "agree" if report.get("agree") else "DISAGREE"
            label = f"arch={report['arch']} {' vs '.join(report['resolved'])} {report['precision']}"
            lines.append(f"{name:<28} {'agree':<6} {label:<58} {verdict:>12} "
                         f"{'max_rel ' + format(worst, '.2g'):>18}")
            continue
        for result in report["runs"]:
            figures = result["figures"]
            extra = ""
            if result["kind"] == "model" and figures.get("mfu") is not None:
                extra = f"MFU {format_figure(figures['mfu'])}"
            elif result["kind"] == "train" and figures.get("data_wait_fraction") is not None:
                extra = f"wait {format_value(figures['data_wait_fraction']['median'], 'fraction')}"
                if figures.get("end_to_end_fraction") is not None:   # reports since 2026-11-27
                    extra += f" e2e {format_value(figures['end_to_end_fraction'], 'fraction')}"
            elif result["kind"] == "data" and figures.get("batch_latency_p90") is not None:
                extra = f"p90 {format_value(figures['batch_latency_p90'], 's')}"
            label = settings_label(result["settings"], LABEL_KEYS[result["kind"]],
                                   result.get("details"))
            lines.append(f"{name:<28} {result['kind']:<6} {label:<58} "
                         f"{format_value(headline(result)):>12} {extra:>18}")
        if "compare" in report:
            compare = report["compare"]
            changed = ", ".join(f"{k} {a} / {b}" for k, (a, b) in compare["changed"].items())
            lines.append(f"{'':<28} {'ratio':<6} {changed:<58} {compare['ratio']:>12.3f}")
        if "compare_failed" in report:
            second = f"{report['compare_failed']['compare']}: the second run failed"
            lines.append(f"{'':<28} {'ratio':<6} {second:<58} {'none':>12}")
    return "\n".join(lines)
