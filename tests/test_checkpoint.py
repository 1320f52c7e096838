"""Atomic checkpoint writes and keep-last-K pruning; written files get the umask's mode."""
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from tcore.checkpoint import (CheckpointError, TMP_PREFIX, atomic_torch_save, latest_checkpoint,
                              list_checkpoints, load_checkpoint, remove_stale_temporaries,
                              rng_state, save_checkpoint, set_rng_state)


class ExplodesWhenPickled:
    """Pickling fails halfway through a checkpoint, like a crash mid-write."""

    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    weights = torch.arange(1000.0)
    first = save_checkpoint(tmp_path, 10, {"w": weights}, keep_last=3)
    before = first.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 20, {"w": weights * 2, "bad": ExplodesWhenPickled()},
                        keep_last=3)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10]
    assert first.read_bytes() == before
    assert torch.equal(load_checkpoint(first)["w"], weights)
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))        # the temporary is cleaned up


def test_partial_temporary_is_ignored_and_removed(tmp_path):
    save_checkpoint(tmp_path, 5, {"x": 1}, keep_last=2)
    # What a kill -9 during torch.save leaves: a truncated hidden temporary.
    partial = tmp_path / f"{TMP_PREFIX}abc.pt"
    partial.write_bytes(b"PK\x03\x04 truncated")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000005.pt"
    assert remove_stale_temporaries(tmp_path) == [partial]
    assert not partial.exists()


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, {"step_value": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 5 and state["step_value"] == 5
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 6, {}, keep_last=0)


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "checkpoint-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint-00000001.pt"):
        load_checkpoint(bad)
    # An emptied file said "cannot read checkpoint: ;" (torch's error has no text).
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001\.pt: cannot read "
                                              r"checkpoint: an empty file \(0 bytes\)$"):
        load_checkpoint(bad)


def test_an_unreadable_newest_checkpoint_points_at_the_newest_readable_one(tmp_path):
    """The hint once named the next older checkpoint unread: when it was as broken, the user
    moved files aside one at a time."""
    from tcore.train import load_resume_state
    paths = [save_checkpoint(tmp_path, step, {"x": step}, keep_last=5) for step in (2, 4, 6)]
    paths[2].write_bytes(b"")
    paths[1].write_bytes(paths[1].read_bytes()[:100])          # cut short
    with pytest.raises(CheckpointError) as info:
        load_resume_state(tmp_path, paths[2])
    assert str(info.value).endswith(
        f"; to resume from checkpoint-00000002.pt instead, move checkpoint-00000004.pt, "
        f"checkpoint-00000006.pt out of {tmp_path}"), str(info.value)
    paths[0].write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_resume_state(tmp_path, paths[2])
    assert str(info.value).endswith("; the older checkpoint-00000002.pt, checkpoint-00000004.pt "
                                    "cannot be read either (cut short or empty)"), str(info.value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_mode_not_the_temporary_files_0600(tmp_path, umask):
    # mkstemp creates 0600 files; renamed as they are, nobody else on a shared
    # machine could read a run. Each writer below goes through a temporary file.
    from tcore.bench.report import write_json_atomic
    from tcore.config import load_config, save_config
    from tcore.eval.io import write_json, write_png
    from tcore.models import build_backbone, export_safetensors

    previous = os.umask(umask)
    try:
        written = [atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "checkpoint.pt"),
                   save_config(load_config("tiny_cpu"), tmp_path / "config.yaml"),
                   write_json_atomic(tmp_path / "bench.json", {"a": 1})]
        write_json(tmp_path / "results.json", {"a": 1})
        write_png(tmp_path / "labels.png", np.zeros((4, 4, 3), np.uint8))
        export_safetensors(build_backbone("vit_tiny"), tmp_path / "teacher.safetensors")
        written += [tmp_path / "results.json", tmp_path / "labels.png",
                    tmp_path / "teacher.safetensors"]
    finally:
        os.umask(previous)
    modes = {Path(p).name: stat.S_IMODE(os.stat(p).st_mode) for p in written}
    assert modes == {name: 0o666 & ~umask for name in modes}


class RunsCodeWhenUnpickled:
    """A pickle that, loaded without weights_only, would create a directory (code run on load)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_loading_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"step": 1, "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="checkpoint-00000001.pt: cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def _draws():
    return (random.random(), random.getrandbits(64), np.random.standard_normal(3).tolist(),
            np.random.randint(0, 2**31, 4).tolist(), torch.rand(4).tolist())


def test_rng_state_survives_a_checkpoint_and_restores_every_generator(tmp_path):
    """python, numpy (its position in the key and the cached second normal included) and
    torch: after a round trip through a checkpoint the same numbers come out again."""
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.standard_normal()      # leaves a cached normal and the key position moved
    random.random()
    torch.rand(3)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()}, keep_last=1)
    expected = _draws()
    _draws()                          # move every generator on
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"])
    assert _draws() == expected
