"""`tcore eval --checkpoint` accepts every layout: our training checkpoints (EMA teacher), our
teacher safetensors, the reference fixture; junk is refused naming the file."""
import argparse

import pytest
import torch

from tcore.checkpoint import rng_state
from tcore.eval.checkpoint import load_eval_backbone
from tcore.models import CheckpointError, export_safetensors


@pytest.fixture(scope="module")
def tiny_tcore():
    from tcore.ssl import TCoRe
    torch.manual_seed(0)
    model = TCoRe({"arch": "vit_tiny", "head": {"prototypes": 64, "hidden": 32, "bottleneck": 16}})
    with torch.no_grad():  # make the teacher differ from the student
        for param in model.teacher.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def teacher_tokens(model, images):
    return model.teacher_backbone().eval().forward_features(images)["patch"]


def test_training_checkpoint_gives_the_ema_teacher(tiny_tcore, tmp_path):
    path = tmp_path / "checkpoint-00000003.pt"
    # the layout `tcore train` writes, RNG states included
    torch.save({"step": 3, "model": tiny_tcore.state_dict(), "rng": [rng_state()],
                "config": {"model": {"arch": "vit_tiny", "patch_size": 16, "registers": 4}}},
               path)
    backbone = load_eval_backbone(path, arch="vit_tiny")
    images = torch.randn(2, 3, 48, 64)
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())       # frozen
    torch.testing.assert_close(backbone.forward_features(images)["patch"],
                               teacher_tokens(tiny_tcore, images))
    # --arch of another width is refused, naming both widths.
    with pytest.raises(ValueError, match=r"backbone width 192 does not match --arch vit_small "
                                         r"\(384\)"):
        load_eval_backbone(path, arch="vit_small")


def test_random_baseline_is_seeded():
    from tcore.eval.checkpoint import random_backbone
    first, again, other = (random_backbone("vit_tiny", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_teacher_safetensors(tiny_tcore, tmp_path):
    path = tmp_path / "teacher_backbone.safetensors"
    export_safetensors(tiny_tcore.teacher_backbone(), path)
    backbone = load_eval_backbone(path)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(backbone.forward_features(images)["patch"],
                               teacher_tokens(tiny_tcore, images))


def test_unreadable_checkpoints_name_the_file(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_eval_backbone(junk)
    with pytest.raises(ValueError, match="unknown arch"):
        load_eval_backbone(junk, arch="vit_huge")


def test_files_that_are_not_checkpoints_are_called_so(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text('{"batches": 3}')
    with pytest.raises(CheckpointError, match=r"stats\.json: not a checkpoint \(neither a "
                                              r"torch\.save file nor safetensors\)"):
        load_eval_backbone(stats)
    # A pickle holding non-tensor objects is named as such, and torch's advice to load it
    # with weights_only=False (running the file's code) is not passed on.
    pickled = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, pickled)
    with pytest.raises(CheckpointError) as info:
        load_eval_backbone(pickled)
    message = str(info.value)
    assert message.startswith(f"{pickled}: cannot be read with tensors only")
    assert "argparse.Namespace" in message and "weights_only" not in message
    # A checkpoint cut short (a copy that stopped) is called damaged, not told to drop its
    # Python objects; the same for a legacy (non-zip) pickle cut short.
    for name, legacy in (("cut.pt", False), ("cut_legacy.pt", True)):
        whole = tmp_path / f"whole_{name}"
        torch.save({"model": {"w": torch.arange(50_000.0)}}, whole,
                   _use_new_zipfile_serialization=not legacy)
        cut = tmp_path / name
        cut.write_bytes(whole.read_bytes()[:100_000])
        with pytest.raises(CheckpointError) as info:
            load_eval_backbone(cut)
        message = str(info.value)
        assert message.startswith(f"{cut}: damaged or incomplete, torch cannot read it ("), message
        assert message.endswith("); copy or save it again") and "tensors only" not in message
