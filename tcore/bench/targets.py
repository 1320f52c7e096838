"""The project's performance targets, checked against `tcore bench` reports.

Targets (one H100 or H200; CPU = these 2-core machines):
- train step, bf16, batch 64, all T-CoRe views: MFU >= 35% for ViT-S/16, >= 45% for ViT-B/16,
  and >= 3x the samples/s of eager fp32 math attention;
- data: the DALI GPU pipeline >= 2x the ViT-S/16 step's samples/s; end to end >= 95% of the
  model-only samples/s; on the CPU, the DALI CPU pipeline >= 1.5x the baseline loader.

A check counts only runs that did the target's work: full-size views (224-px global, 8 local
crops of 96 px), and on the GPU batch 64 with no `model.*` overrides; no run with a timing
warning; and a ratio only between two runs on the same device that did the same work (a DALI
and a baseline run with identical overrides). It reads the median over each configuration's
runs (or pairs), never the best single one, and shows the configuration that does best.
Runs it left out are listed under it with the reason. A target with no run that measures it
reads "not measured".
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tcore.bench.report import headline, split_overrides
from tcore.bench.stats import median

MFU_TARGETS = {"vit_small": 0.35, "vit_base": 0.45}
SPEEDUP_OVER_FP32_MATH = 3.0
DATA_OVER_MODEL = 2.0
END_TO_END_FRACTION = 0.95
CPU_DALI_OVER_BASELINE = 1.5
TARGET_BATCH = 64
TARGET_VIEWS = {"global_size": 224, "local_size": 96, "n_local": 8}  # PipelineConfig's defaults
# What tells two runs of one kind apart as configurations (the rest is how long they ran).
CONFIG_KEYS = {"model": ("attention", "precision", "compile", "overrides"),
               "data": ("loader", "threads", "overrides"),
               "train": ("loader", "attention", "precision", "compile", "threads", "overrides")}


@dataclass(frozen=True)
class TargetCheck:
    name: str
    required: str
    measured: str
    passed: bool | None  # None: not measured
    basis: str = ""      # the configuration measured, and over how many runs or pairs
    left_out: tuple[str, ...] = ()

    def line(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "not measured"}[self.passed]
        basis = f"  [{self.basis}]" if self.basis else ""
        return f"  {self.name:<44} {self.measured:>14}  (need {self.required})  {verdict}{basis}"

    def lines(self) -> list[str]:
        return [self.line()] + [f"      left out: {why}" for why in self.left_out]


def all_runs(reports: dict[str, dict]) -> list[dict]:
    """Every run, with `_where` ("report" or "report run 2") to name it in the table."""
    runs = []
    for name, report in reports.items():
        found = report.get("runs", [])
        for number, run in enumerate(found, 1):
            runs.append({**run, "_where": name if len(found) == 1 else f"{name} run {number}"})
    return runs


def on_gpu(run: dict) -> bool:
    return str(run.get("environment", {}).get("device", "")).startswith("cuda")


def device_name(run: dict) -> str:
    return run.get("environment", {}).get("device_name", "")


def mfu_of(run: dict) -> float:
    return run["figures"]["mfu"]["median"]


def setting(run: dict, key: str):
    """A run's setting, as resolved where it was "auto" (attention, precision)."""
    return run.get("details", {}).get(f"{key}_resolved", run["settings"].get(key))


def overrides_of(run: dict) -> list[str]:
    return split_overrides(run["settings"].get("overrides") or "")


def views_of(run: dict) -> dict:
    """The view sizes a run worked on: `bench model`'s settings, the loaders' recorded views,
    or (reports from before those were recorded) the defaults with the run's overrides."""
    if run["kind"] == "model":
        return {key: run["settings"].get(key) for key in TARGET_VIEWS}
    recorded = run.get("details", {}).get("views")
    if recorded:
        return recorded
    prefix = "views." if run["kind"] == "data" else "data.pipeline.views."
    views = dict(TARGET_VIEWS)
    for item in overrides_of(run):
        key, _, value = (part.strip() for part in item.partition("="))
        if key.startswith(prefix) and key[len(prefix):] in views:
            views[key[len(prefix):]] = int(value) if value.isdigit() else value
    return views


def timing_warnings(run: dict) -> list[str]:
    """The run's warnings that concern its timing (peak memory's concern no target)."""
    return [w for w in run.get("warnings") or [] if not w.startswith("peak_memory")]


def view_misses(run: dict) -> list[str]:
    """The view sizes in which a run fell short of every T-CoRe view ([] when it did them)."""
    views = views_of(run)
    return [f"{key} {views.get(key)} (target {want})"
            for key, want in TARGET_VIEWS.items() if views.get(key) != want]


def gpu_misses(run: dict) -> list[str]:
    """Why a GPU run did not do the targets' work ([] when it did)."""
    misses = []
    batch = run["settings"].get("batch")
    if batch != TARGET_BATCH:
        misses.append(f"batch {batch} (target {TARGET_BATCH})")
    misses += view_misses(run)
    model_overrides = [item for item in overrides_of(run) if item.startswith("model.")]
    if model_overrides:
        misses.append(f"model overrides {','.join(model_overrides)}")
    return misses + [f"warning: {w}" for w in timing_warnings(run)]


def qualify(runs: list[dict], misses) -> tuple[list[dict], list[str]]:
    """(the runs with no misses, "where: why" for the others)."""
    kept, left_out = [], []
    for run in runs:
        why = misses(run)
        if why:
            left_out.append(f"{run['_where']}: {'; '.join(why)}")
        else:
            kept.append(run)
    return kept, left_out


def config_label(run: dict) -> str:
    parts = []
    for key in CONFIG_KEYS[run["kind"]]:
        value = setting(run, key)
        if value not in (None, ""):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def best_configuration(values: list[tuple[str, float]]) -> tuple[str, float, int]:
    """(configuration, median, count) of the configuration with the highest median, over
    (configuration, value) pairs: repeats of one configuration are summarised, not
    picked from."""
    groups = defaultdict(list)
    for config, value in values:
        groups[config].append(value)
    config, group = max(groups.items(), key=lambda item: median(item[1]))
    return config, median(group), len(group)


def measured_check(name: str, required: str, values: list[tuple[str, float]], passes,
                   text, what: str, left_out: list[str]) -> TargetCheck:
    """A check over (configuration, value) pairs: "not measured" when there are none."""
    if not values:
        return TargetCheck(name, required, "-", None, left_out=tuple(left_out))
    config, value, count = best_configuration(values)
    basis = f"{config}; median of {count} {what}{'s' if count > 1 else ''}"
    return TargetCheck(name, required, text(value), passes(value), basis, tuple(left_out))


def gpu_model_runs(runs: list[dict], arch: str, **settings) -> list[dict]:
    return [r for r in runs if r["kind"] == "model" and on_gpu(r) and r["settings"].get("arch") == arch
            and all(setting(r, k) == v for k, v in settings.items())]


def check_mfu(runs: list[dict], arch: str) -> TargetCheck:
    candidates, left_out = qualify(gpu_model_runs(runs, arch, precision="bf16"), gpu_misses)
    need = MFU_TARGETS[arch]
    values = [(config_label(r), mfu_of(r)) for r in candidates]
    return measured_check(f"MFU {arch} bf16 batch {TARGET_BATCH}", f">= {need:.0%}", values,
                          lambda v: v >= need, lambda v: f"{v:.1%}", "run", left_out)


def pair_ratios(firsts: list[dict], seconds: list[dict], same, label,
                matching: str = "the target's settings") -> tuple[list, list[str]]:
    """(configuration, first/second samples/s) over the pairs `same` accepts (same device
    always), and "where: why" for the runs on either side that found no partner (when there
    were partners to be had)."""
    values, paired = [], set()
    for first in firsts:
        for second in seconds:
            if device_name(first) == device_name(second) and same(first, second):
                values.append((label(first, second), headline(first) / headline(second)))
                paired.update((first["_where"], second["_where"]))
    unpaired = [f"{run['_where']}: no run to pair it with on the same device with {matching}"
                for run in firsts + seconds if run["_where"] not in paired] if firsts and seconds else []
    return values, unpaired


def check_speedup(runs: list[dict], arch: str) -> TargetCheck:
    fast, left_fast = qualify(gpu_model_runs(runs, arch, precision="bf16"), gpu_misses)
    slow, left_slow = qualify(gpu_model_runs(runs, arch, precision="fp32", attention="math",
                                             compile=False), gpu_misses)
    values, unpaired = pair_ratios(fast, slow, lambda a, b: True,
                                   lambda a, b: config_label(a), "batch 64 and full-size views")
    return measured_check(f"{arch} best bf16 / eager fp32 math", f">= {SPEEDUP_OVER_FP32_MATH:g}x",
                          values, lambda v: v >= SPEEDUP_OVER_FP32_MATH, lambda v: f"{v:.2f}x",
                          "pair", left_fast + left_slow + unpaired)


def check_data_over_model(runs: list[dict]) -> TargetCheck:
    dali, left_dali = qualify([r for r in runs if r["kind"] == "data" and on_gpu(r)
                               and r["settings"].get("loader") == "dali"], gpu_misses)
    model, left_model = qualify(gpu_model_runs(runs, "vit_small", precision="bf16"), gpu_misses)
    values, unpaired = pair_ratios(dali, model, lambda a, b: True,
                                   lambda a, b: f"{config_label(a)} / {config_label(b)}",
                                   "batch 64 and full-size views")
    return measured_check("DALI GPU / ViT-S step samples/s", f">= {DATA_OVER_MODEL:g}x", values,
                          lambda v: v >= DATA_OVER_MODEL, lambda v: f"{v:.2f}x", "pair",
                          left_dali + left_model + unpaired)


def check_end_to_end(runs: list[dict]) -> TargetCheck:
    keys = ("arch", "batch", "attention", "precision", "compile")
    trains, left_train = qualify([r for r in runs if r["kind"] == "train" and on_gpu(r)], gpu_misses)
    # A train run that timed its own step alone after closing its loader (`bench train`'s
    # end_to_end_fraction: same process, same compiled step) is its own pair; a report
    # without that figure is paired with a `bench model` run of the same step settings.
    own = [(f"{config_label(t)} (its own model-only steps)", t["figures"]["end_to_end_fraction"])
           for t in trains if t["figures"].get("end_to_end_fraction") is not None]
    trains = [t for t in trains if t["figures"].get("end_to_end_fraction") is None]
    models = [r for r in runs if r["kind"] == "model" and on_gpu(r)
              and any(all(setting(r, k) == setting(t, k) for k in keys) for t in trains)]
    models, left_model = qualify(models, gpu_misses)
    values, unpaired = pair_ratios(trains, models,
                                   lambda t, m: all(setting(t, k) == setting(m, k) for k in keys),
                                   lambda t, m: config_label(t), "the same " + ", ".join(keys))
    return measured_check("end to end / model-only samples/s", f">= {END_TO_END_FRACTION:.0%}",
                          own + values, lambda v: v >= END_TO_END_FRACTION, lambda v: f"{v:.1%}",
                          "pair", left_train + left_model + unpaired)


def check_cpu_data(runs: list[dict]) -> TargetCheck:
    keys = ("data", "threads", "batch", "overrides")  # the same work on both sides

    def misses(run: dict) -> list[str]:   # the full set of views, at any batch size
        return view_misses(run) + [f"warning: {w}" for w in timing_warnings(run)]

    cpu = [r for r in runs if r["kind"] == "data" and not on_gpu(r)]
    dali, left_dali = qualify([r for r in cpu if r["settings"].get("loader") == "dali"], misses)
    base, left_base = qualify([r for r in cpu if r["settings"].get("loader") == "baseline"], misses)
    values, unpaired = pair_ratios(
        dali, base, lambda d, b: all(d["settings"].get(k) == b["settings"].get(k) for k in keys),
        lambda d, b: " ".join(f"{k}={d['settings'].get(k)}" for k in keys[1:]
                              if d["settings"].get(k) not in (None, "")),
        "the same data, threads, batch and overrides")
    return measured_check("DALI CPU / baseline loader samples/s", f">= {CPU_DALI_OVER_BASELINE:g}x",
                          values, lambda v: v >= CPU_DALI_OVER_BASELINE, lambda v: f"{v:.2f}x",
                          "pair", left_dali + left_base + unpaired)


def check_targets(reports: dict[str, dict]) -> list[TargetCheck]:
    runs = all_runs(reports)
    return [check_mfu(runs, "vit_small"), check_mfu(runs, "vit_base"),
            check_speedup(runs, "vit_small"), check_speedup(runs, "vit_base"),
            check_data_over_model(runs), check_end_to_end(runs), check_cpu_data(runs)]


def format_targets(reports: dict[str, dict]) -> str:
    return "\n".join(["targets:"] + [line for check in check_targets(reports)
                                     for line in check.lines()])
