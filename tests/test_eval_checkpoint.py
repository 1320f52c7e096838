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
    # --arch of another width is refused, naming both sizes.
    with pytest.raises(ValueError, match=r"backbone of width 192 and 2 blocks does not match "
                                         r"--arch vit_small \(width 384, 12 blocks\)"):
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


def folded(backbone_state: dict, prefix: str = "") -> dict:
    """A backbone state in tcore's layout before 2026-11-27: the cls position folded into
    cls_token, no cls_pos_embed."""
    state = dict(backbone_state)
    position = state.pop(f"{prefix}cls_pos_embed")
    state[f"{prefix}cls_token"] = state[f"{prefix}cls_token"] + position
    return state


def test_states_of_the_earlier_folded_layout_evaluate_as_the_same_network(tiny_tcore, tmp_path):
    """README: checkpoints of the folded layout still load for evaluation. They did through
    Backbone.load_state_dict, but load_reference compared key sets first and refused them."""
    from safetensors.torch import save_file
    images = torch.randn(1, 3, 32, 48)
    expected = teacher_tokens(tiny_tcore, images)
    teacher = {f"backbone.{k}": v.contiguous()
               for k, v in tiny_tcore.teacher_backbone().state_dict().items()}
    export = tmp_path / "teacher_backbone.safetensors"
    save_file(folded(teacher, "backbone."), str(export), metadata={"num_heads": "3",
                                                                     "format": "tcore"})
    state = folded(folded(tiny_tcore.state_dict(), "teacher.backbone."), "student.backbone.")
    checkpoint = tmp_path / "checkpoint-00000003.pt"
    torch.save({"step": 3, "model": state, "config": {"model": {"arch": "vit_tiny"}}},
               checkpoint)
    for path in (export, checkpoint):
        backbone = load_eval_backbone(path)
        torch.testing.assert_close(backbone.forward_features(images)["patch"], expected)


def plain_teacher_state(model) -> dict:
    """The teacher backbone as a DINOv2-layout state dict (what other code bases save)."""
    from tcore.models.reference import backbone_to_official
    return backbone_to_official(model.teacher_backbone().state_dict())


def test_wrapper_prefixes_of_ddp_and_torch_compile_are_taken_off(tiny_tcore, tmp_path):
    images = torch.randn(1, 3, 32, 32)
    expected = teacher_tokens(tiny_tcore, images)
    state = plain_teacher_state(tiny_tcore)
    layouts = {
        "ddp_plain.pth": {f"module.{k}": v for k, v in state.items()},
        "compiled_ddp.pth": {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
        "ddp_eval_layout.pth": {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}},
    }
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / name)
        backbone = load_eval_backbone(tmp_path / name, arch="vit_tiny")
        torch.testing.assert_close(backbone.forward_features(images)["patch"], expected)
    # A prefix on some keys only is part of their names, not a wrapper's: left as it is.
    some = dict(state)
    some["module.norm.weight"] = some.pop("norm.weight")
    torch.save(some, tmp_path / "some_prefixed.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['norm\.weight'\]; unexpected "
                                              r"keys \['module\.norm\.weight'\]"):
        load_eval_backbone(tmp_path / "some_prefixed.pth", arch="vit_tiny")


def test_evaluation_reads_the_backbone_alone(tiny_tcore, tmp_path):
    """A head or PMM that does not fit is no reason to refuse an evaluation, which uses
    neither; load_reference itself still refuses it."""
    from tcore.models import load_reference
    teacher = {f"backbone.{k}": v for k, v in plain_teacher_state(tiny_tcore).items()}
    teacher.update({f"dino_head.{k}": v for k, v in tiny_tcore.teacher.head.state_dict().items()})
    del teacher["dino_head.mlp.2.bias"]
    path = tmp_path / "head_missing.pth"
    torch.save({"teacher": teacher}, path)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_eval_backbone(path).forward_features(images)["patch"],
                               teacher_tokens(tiny_tcore, images))
    with pytest.raises(CheckpointError, match=r"DINO head does not match .*'mlp\.2\.bias'"):
        load_reference(path)


def test_a_state_dict_cut_short_is_refused_by_arch_and_sizes_are_traced(tiny_tcore, tmp_path):
    state = plain_teacher_state(tiny_tcore)
    shallow = tmp_path / "one_block.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, shallow)
    assert len(load_eval_backbone(shallow).blocks) == 1   # what the file holds, without --arch
    with pytest.raises(ValueError, match=r"one_block\.pth: backbone of width 192 and 1 blocks "
                                         r"does not match --arch vit_tiny \(width 192, 2 blocks\)"):
        load_eval_backbone(shallow, arch="vit_tiny")
    # A broken tensor that sizes the model shows up as the keys that depend on it; the
    # message says which tensors gave the sizes, and which side is the file.
    bad = dict(state, **{"blocks.0.mlp.fc1.weight": torch.zeros(5, 192)})
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(CheckpointError) as info:
        load_eval_backbone(tmp_path / "bad_shape.pth")
    message = str(info.value)
    assert "blocks.0.mlp.fc1.bias file (768,) != model (5,)" in message, message
    assert "blocks.0.mlp.fc1.weight (MLP width 5)" in message, message
