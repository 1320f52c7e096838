"""Shared, session-scoped test data: a small synthetic dataset and VP9 shards built from it.

Both are cheap (about a second each on 2 cores) and read-only for tests: copy them before
modifying anything.
"""
from pathlib import Path

import pytest

from tcore.preprocess.shards import build_shards
from tcore.preprocess.synth import make_synthetic

SYNTH_VIDEOS = 12  # 4 classes x 3, in mp4/h264, webm/vp9 and avi/mjpeg
SYNTH_FRAMES = 30
SYNTH_SIZE = (160, 128)
SHARD_FRAMES = 20
SHARD_SHORT_SIDE = 128
SHARD_SAMPLES = 5  # 12 videos -> 3 shards of 5, 5, 2

# The files with the longest tests on 2 cores (`--durations`, 2026-11-28), longest first, are
# handed out first. `make test` gives whole files to its two workers (`--dist loadfile`) in
# collection order, and alphabetical order left the two longest for the end.
SLOW_FILES_FIRST = ("test_train_interrupts.py", "test_train_fsdp.py", "test_bench.py",
                    "test_train.py", "test_torch_photometric.py", "test_pipeline_resume.py",
                    "test_demo_synth_errors.py", "test_demo.py", "test_pipeline_producer.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest as is


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """`make_synthetic` output: `train/<class>/<video>` (12 videos of 30 frames at 160x128)
    and `davis/` (3 videos of 16 frames at 160x96, 2 objects each)."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, seed=0, videos=SYNTH_VIDEOS, frames=SYNTH_FRAMES, size=SYNTH_SIZE)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    """VP9 shards of `synth_root/train`: T=20, short side 128 (clips are 160x128), 3 shards
    (`shard-000000.tar` .. `shard-000002.tar` with `.idx`), `manifest.json`."""
    out = tmp_path_factory.mktemp("shards") / "vp9"
    build_shards(synth_root / "train", out, frames=SHARD_FRAMES, short_side=SHARD_SHORT_SIDE,
                 codec="vp9", samples_per_shard=SHARD_SAMPLES, workers=1, progress=False)
    return out
