"""The project's performance targets, checked against `tcore bench` reports.

Targets (one H100 or H200; CPU = these 2-core machines):
- train step, bf16, batch 64, all T-CoRe views: MFU >= 35% for ViT-S/16, >= 45% for ViT-B/16,
  and >= 3x the samples/s of eager fp32 math attention;
- data: the DALI GPU pipeline >= 2x the ViT-S/16 step's samples/s; end to end >= 95% of the
  model-only samples/s; on the CPU, the DALI CPU pipeline >= 1.5x the baseline loader.
A target with no run that measures it reads "not measured".
"""
from __future__ import annotations

from dataclasses import dataclass

from tcore.bench.report import headline

MFU_TARGETS = {"vit_small": 0.35, "vit_base": 0.45}
SPEEDUP_OVER_FP32_MATH = 3.0
DATA_OVER_MODEL = 2.0
END_TO_END_FRACTION = 0.95
CPU_DALI_OVER_BASELINE = 1.5
TARGET_BATCH = 64


@dataclass(frozen=True)
class TargetCheck:
    name: str
    required: str
    measured: str
    passed: bool | None  # None: not measured

    def line(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "not measured"}[self.passed]
        return f"  {self.name:<44} {self.measured:>14}  (need {self.required})  {verdict}"


def all_runs(reports: dict[str, dict]) -> list[dict]:
    return [run for report in reports.values() for run in report.get("runs", [])]


def on_gpu(run: dict) -> bool:
    return run["environment"]["device"].startswith("cuda")


def mfu_of(run: dict) -> float:
    return run["figures"]["mfu"]["median"]


def setting(run: dict, key: str):
    """A run's setting, as resolved where it was "auto" (attention, precision)."""
    return run.get("details", {}).get(f"{key}_resolved", run["settings"].get(key))


def model_runs(runs: list[dict], arch: str, **settings) -> list[dict]:
    return [r for r in runs if r["kind"] == "model" and on_gpu(r) and r["settings"]["arch"] == arch
            and r["settings"]["batch"] == TARGET_BATCH
            and all(setting(r, k) == v for k, v in settings.items())]


def check_mfu(runs: list[dict], arch: str) -> TargetCheck:
    candidates = model_runs(runs, arch, precision="bf16")
    need = MFU_TARGETS[arch]
    name = f"MFU {arch} bf16 batch {TARGET_BATCH}"
    if not candidates:
        return TargetCheck(name, f">= {need:.0%}", "-", None)
    best = max(candidates, key=mfu_of)
    return TargetCheck(name, f">= {need:.0%}", f"{mfu_of(best):.1%}", mfu_of(best) >= need)


def check_speedup(runs: list[dict], arch: str) -> TargetCheck:
    fast = model_runs(runs, arch, precision="bf16")
    slow = model_runs(runs, arch, precision="fp32", attention="math", compile=False)
    name = f"{arch} best bf16 / eager fp32 math"
    if not fast or not slow:
        return TargetCheck(name, f">= {SPEEDUP_OVER_FP32_MATH:g}x", "-", None)
    ratio = max(map(headline, fast)) / max(map(headline, slow))
    return TargetCheck(name, f">= {SPEEDUP_OVER_FP32_MATH:g}x", f"{ratio:.2f}x",
                       ratio >= SPEEDUP_OVER_FP32_MATH)


def check_data_over_model(runs: list[dict]) -> TargetCheck:
    dali = [r for r in runs if r["kind"] == "data" and on_gpu(r) and r["settings"]["loader"] == "dali"]
    model = model_runs(runs, "vit_small", precision="bf16")
    name = "DALI GPU / ViT-S step samples/s"
    if not dali or not model:
        return TargetCheck(name, f">= {DATA_OVER_MODEL:g}x", "-", None)
    ratio = max(map(headline, dali)) / max(map(headline, model))
    return TargetCheck(name, f">= {DATA_OVER_MODEL:g}x", f"{ratio:.2f}x", ratio >= DATA_OVER_MODEL)


def check_end_to_end(runs: list[dict]) -> TargetCheck:
    name = "end to end / model-only samples/s"
    best = None
    for train in (r for r in runs if r["kind"] == "train" and on_gpu(r)):
        keys = ("arch", "batch", "attention", "precision", "compile")
        same = [r for r in runs if r["kind"] == "model" and on_gpu(r)
                and all(setting(r, k) == setting(train, k) for k in keys)]
        if same:
            fraction = headline(train) / max(map(headline, same))
            best = fraction if best is None else max(best, fraction)
    if best is None:
        return TargetCheck(name, f">= {END_TO_END_FRACTION:.0%}", "-", None)
    return TargetCheck(name, f">= {END_TO_END_FRACTION:.0%}", f"{best:.1%}", best >= END_TO_END_FRACTION)


def check_cpu_data(runs: list[dict]) -> TargetCheck:
    name = "DALI CPU / baseline loader samples/s"
    pairs = []
    for dali in (r for r in runs if r["kind"] == "data" and not on_gpu(r)
                 and r["settings"]["loader"] == "dali"):
        for base in (r for r in runs if r["kind"] == "data" and not on_gpu(r)
                     and r["settings"]["loader"] == "baseline"):
            if all(dali["settings"][k] == base["settings"][k] for k in ("data", "threads", "batch")):
                pairs.append(headline(dali) / headline(base))
    if not pairs:
        return TargetCheck(name, f">= {CPU_DALI_OVER_BASELINE:g}x", "-", None)
    ratio = max(pairs)
    return TargetCheck(name, f">= {CPU_DALI_OVER_BASELINE:g}x", f"{ratio:.2f}x",
                       ratio >= CPU_DALI_OVER_BASELINE)


def check_targets(reports: dict[str, dict]) -> list[TargetCheck]:
    runs = all_runs(reports)
    return [check_mfu(runs, "vit_small"), check_mfu(runs, "vit_base"),
            check_speedup(runs, "vit_small"), check_speedup(runs, "vit_base"),
            check_data_over_model(runs), check_end_to_end(runs), check_cpu_data(runs)]


def format_targets(reports: dict[str, dict]) -> str:
    return "\n".join(["targets:"] + [check.line() for check in check_targets(reports)])
