"""`tcore demo`: the whole job on a built-in synthetic dataset, on the CPU, in a few minutes.

synthetic videos (`make_synthetic`) -> VP9 shards (`build_shards`) -> training of the
`tiny_cpu` preset -> loss curve PNG -> DAVIS-style label propagation J&F of the trained
teacher next to the same network at random initialisation -> `summary.json`.

Everything lands under OUTPUT. The demo claims OUTPUT with a `demo.json` marker and only
ever replaces what it made (the four directories, loss_curve.png, summary.json) in a
directory carrying that marker; a non-empty directory without it is refused:
  demo.json             the marker: this directory belongs to `tcore demo`
  synthetic/            videos (train/) and the DAVIS-layout held-out part (davis/)
  shards/               WebDataset shards + manifest.json
  run/                  the training run (config.yaml, checkpoints/, metrics.jsonl,
                        tensorboard/, teacher_backbone.safetensors)
  loss_curve.png        the losses per step
  eval/trained, eval/random   label-propagation predictions and results.json
  summary.json          what was run and the numbers
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tcore.checkpoint import load_checkpoint
from tcore.config import load_config
from tcore.preprocess.files import (check_output_path, make_output_directory, write_atomically,
                                    write_text_atomically)

DEMO_PRESET = "tiny_cpu"
DEMO_DIRS = ("synthetic", "shards", "run", "eval")  # replaced on every demo run
DEMO_FILES = ("summary.json", "loss_curve.png")     # likewise
DEMO_MARKER = "demo.json"  # marks OUTPUT as the demo's own, so that rerunning may clear it


@dataclass(frozen=True)
class DemoSettings:
    output: str = "runs/demo"
    steps: int | None = None      # None: the preset's whole schedule
    videos: int = 24
    source_frames: int = 40
    davis_videos: int = 8
    seed: int = 0
    progress: bool = True

    def validate(self) -> "DemoSettings":
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.videos < 1 or self.davis_videos < 1:
            raise ValueError("--videos and the DAVIS part need at least one video each")
        if self.source_frames < 20:
            raise ValueError("source videos need at least 20 frames (shards hold T = 20)")
        return self


def make_data(settings: DemoSettings, out: Path, log) -> tuple[dict, Path]:
    """Synthetic videos and their VP9 shards."""
    from tcore.preprocess.shards import build_shards
    from tcore.preprocess.synth import make_synthetic
    started = time.time()
    synth = make_synthetic(out / "synthetic", seed=settings.seed, videos=settings.videos,
                           frames=settings.source_frames, size=(160, 128),
                           davis_videos=settings.davis_videos, davis_frames=16,
                           davis_size=(160, 96))
    log(f"[1/4] synthetic videos: {out / 'synthetic'} ({time.time() - started:.0f} s)")
    started = time.time()
    shards = out / "shards"
    build_shards(synth["train_dir"], shards, frames=20, short_side=128, codec="vp9",
                 samples_per_shard=8, workers=1, progress=settings.progress)
    log(f"[2/4] VP9 shards: {shards} ({time.time() - started:.0f} s)")
    return synth, shards


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path:
    """Total and per-term losses against the step, written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tcore.metrics_log import read_metrics
    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    terms = [k for k in records[0] if k.startswith("loss/")]
    fig, (ax_total, ax_terms) = plt.subplots(1, 2, figsize=(11, 4))
    ax_total.plot(steps, [r["loss/total"] for r in records], color="black")
    ax_total.set(title="total loss", xlabel="step")
    for term in terms:
        if term != "loss/total":
            ax_terms.plot(steps, [r[term] for r in records], label=term[5:])
    ax_terms.set(title="loss terms", xlabel="step")
    ax_terms.legend(fontsize=8)
    fig.tight_layout()
    try:
        return write_atomically(png_path, lambda temporary: fig.savefig(temporary, format="png",
                                                                       dpi=100))
    finally:
        plt.close(fig)


def demo_backbones(cfg, checkpoint: Path):
    """(trained teacher backbone, the same network at its random initialisation)."""
    from tcore.train import build_model
    device = torch.device("cpu")
    torch.manual_seed(int(cfg.train.seed))
    random_model = build_model(cfg, device)
    trained_model = build_model(cfg, device)
    trained_model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return trained_model.teacher_backbone(), random_model.teacher_backbone()


def evaluate_label_propagation(cfg, checkpoint: Path, davis_dir: Path, out: Path,
                               progress: bool) -> dict:
    """J&F of the trained and the randomly initialised network on the synthetic DAVIS part."""
    from tcore.eval.davis import evaluate_davis
    trained, random_init = demo_backbones(cfg, checkpoint)
    scores = {}
    for name, backbone in (("trained", trained), ("random_init", random_init)):
        results = evaluate_davis(backbone, davis_dir, out / name, size=None, device="cpu",
                                 progress=progress)
        scores[name] = {k: results["summary"][k] for k in ("J&F-Mean", "J-Mean", "F-Mean")}
        scores[name]["results"] = str(out / name / "results.json")
    return scores


def _write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    write_text_atomically(path, text)


def is_demo_output(out: Path) -> bool:
    """True when `out` carries the marker an earlier `tcore demo` wrote there."""
    try:
        marker = json.loads((out / DEMO_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("made_by") == "tcore demo"


def claim_output(out: Path) -> None:
    """Make `out` the demo's (marker first), then clear what an earlier demo left there.

    Only a new or empty directory, or one already marked, is taken: anything else may hold
    someone's work, which the clearing below would delete."""
    check_output_path(out, f"--output {out}")
    if not is_demo_output(out):
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--output {out}: not empty and not made by `tcore demo` (no "
                             f"{DEMO_MARKER}); choose another --output or empty it")
        make_output_directory(out, f"--output {out}")
        _write_json(out / DEMO_MARKER, {"made_by": "tcore demo",
                                        "replaced_on_each_run": [*DEMO_DIRS, *DEMO_FILES]})
    # summary.json first: a run killed from here on leaves no summary naming deleted files.
    for name in DEMO_FILES:
        (out / name).unlink(missing_ok=True)
    for name in DEMO_DIRS:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


def run_demo(settings: DemoSettings, log=print) -> dict:
    """Run the demo; return (and write to OUTPUT/summary.json) what it produced."""
    from tcore.metrics_log import read_metrics
    from tcore.train import train
    settings.validate()
    out = Path(settings.output)
    # A fresh job each time (seconds of data generation) in a directory the demo owns.
    claim_output(out)
    cfg = load_config(DEMO_PRESET, [f"train.seed={settings.seed}"])
    schedule_steps = int(cfg.optim.epochs) * int(cfg.optim.official_epoch_length)
    if settings.steps is not None and settings.steps > schedule_steps:
        # The preset's lr / teacher schedules end there, and train() stops at their end.
        log(f"note: --steps {settings.steps} is more than the {DEMO_PRESET} schedules' "
            f"{schedule_steps} steps: training {schedule_steps}")
    synth, shards = make_data(settings, out, log)
    started = time.time()
    result = train(cfg, shards, out / "run", max_steps=settings.steps,
                   progress=settings.progress, show_plan=False)   # one line per stage
    train_seconds = time.time() - started
    if result.stopped_by:   # asked to stop (SIGTERM): no loss curve or scores of a cut run
        log(f"[3/4] stopped by {result.stopped_by} after step {result.end_step}; the demo "
            "starts afresh when run again")
        raise SystemExit(128 + signal.Signals[result.stopped_by].value)
    records = read_metrics(result.metrics)
    log(f"[3/4] trained {result.end_step} steps of {DEMO_PRESET} in {train_seconds:.0f} s: "
        f"loss {records[0]['loss/total']:.3f} -> {records[-1]['loss/total']:.3f}")
    curve = plot_loss_curve(result.metrics, out / "loss_curve.png")

    started = time.time()
    scores = evaluate_label_propagation(cfg, result.last_checkpoint, Path(synth["davis_dir"]),
                                        out / "eval", settings.progress)
    log(f"[4/4] label propagation J&F on the synthetic DAVIS part ({time.time() - started:.0f} s):"
        f" trained {scores['trained']['J&F-Mean']:.3f}, "
        f"random init {scores['random_init']['J&F-Mean']:.3f}")

    summary = {
        "settings": asdict(settings), "preset": DEMO_PRESET,
        "steps": result.end_step, "train_seconds": round(train_seconds, 1),
        "loss_first": records[0]["loss/total"], "loss_last": records[-1]["loss/total"],
        "davis_jf": scores,
        "paths": {"synthetic": str(out / "synthetic"), "shards": str(shards),
                  "run": str(result.run_dir), "config": str(result.run_dir / "config.yaml"),
                  "checkpoint": str(result.last_checkpoint),
                  "teacher_backbone": str(result.teacher_export),
                  "metrics": str(result.metrics),
                  "tensorboard": str(result.run_dir / "tensorboard"),
                  "loss_curve": str(curve), "eval": str(out / "eval")},
    }
    _write_json(out / "summary.json", summary)
    summary["paths"]["summary"] = str(out / "summary.json")
    return summary
