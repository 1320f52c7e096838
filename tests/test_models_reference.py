"""Reference checkpoints: the fixture's outputs, the three checkpoint layouts, export round trips."""
import json

import pytest
import torch

from tcore import losses
from tcore.models import (CheckpointError, DINOHead, PatchMatchingModule, build_backbone,
                          export_reference, export_safetensors, load_reference)
from tcore.models.reference import official_checkpoint
from tcore.models.vit import Backbone

from reference_paths import OFFICIAL_TINY as FIXTURE, REFERENCE_DIR as REFERENCE

RTOL = 1e-5  # the fixture README: same function => ~1e-5 relative in float32

def assert_close_rel(actual, expected, rtol=RTOL):
    """Relative error of the whole tensor (norm of the difference over the norm)."""
    assert actual.shape == expected.shape
    error = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
    assert error < rtol, f"relative error {error:.3g} >= {rtol}"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def eval_checkpoint(fixture, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "official_tiny_eval.pth"
    torch.save(fixture["checkpoint"], path)
    return path


@pytest.fixture(scope="module")
def model(fixture, eval_checkpoint):
    return load_reference(eval_checkpoint, pmm_heads=fixture["config"]["pmm_heads"])


def test_load_eval_layout_builds_the_fixture_sizes(model, fixture):
    cfg = fixture["config"]
    assert model.source == "eval" and not model.training
    assert model.backbone.embed_dim == cfg["embed_dim"] and model.backbone.num_blocks == cfg["depth"]
    assert model.backbone.blocks[0].attn.num_heads == cfg["num_heads"]
    assert model.backbone.num_registers == cfg["num_register_tokens"]
    assert model.head.out_dim == cfg["head_out_dim"] and model.head.bottleneck_dim == cfg["head_bottleneck_dim"]
    assert model.pmm.num_heads == cfg["pmm_heads"] and model.pmm.depth == cfg["pmm_blocks"]
    assert next(model.parameters()).device.type == "cpu"


def test_backbone_tokens_match_fixture(model, fixture):
    inputs, outputs = fixture["inputs"], fixture["outputs"]
    with torch.no_grad():
        plain = model.backbone.forward_features(inputs["images_224"])
        masked = model.backbone.forward_features(inputs["images_224"], inputs["masks"])
        rect = model.backbone.forward_features(inputs["image_rect"])
    assert_close_rel(plain["cls"], outputs["cls_224"])
    assert_close_rel(plain["patch"], outputs["patch_224"])
    assert_close_rel(plain["registers"], outputs["reg_224"])
    assert_close_rel(masked["cls"], outputs["cls_224_masked"])
    assert_close_rel(masked["patch"], outputs["patch_224_masked"])
    assert_close_rel(rect["patch"], outputs["patch_rect"])  # 8 x 12 grid: pos-embed interpolation
    assert_close_rel(torch.cat([rect["cls"][:, None], rect["patch"]], dim=1), outputs["eval_tokens_rect"])


def test_pmm_and_head_match_fixture(model, fixture):
    outputs = fixture["outputs"]
    with torch.no_grad():
        out, attention = model.pmm(outputs["pmm_memory"], outputs["pmm_query"], return_attention=True)
        fused = model.pmm(outputs["pmm_memory"], outputs["pmm_query"])  # SDPA path, no weights
        head = model.head(outputs["cls_224"])
    assert_close_rel(out, outputs["pmm_out"])
    assert_close_rel(fused, outputs["pmm_out"])
    assert_close_rel(attention, outputs["pmm_cross_attn"])
    assert_close_rel(head, outputs["head_cls_224"])


def test_losses_match_fixture(model, fixture):
    """The three losses exactly as the fixture README defines them (zero center, T_t 0.05)."""
    cfg, inputs, outputs = fixture["config"], fixture["inputs"], fixture["outputs"]
    teacher_temp, student_temp = cfg["teacher_temp"], cfg["student_temp"]
    zero_center = torch.zeros(1, cfg["head_out_dim"])
    masks = inputs["masks"]
    mask_indices = masks.reshape(-1).nonzero()[:, 0]
    mask_weights = (1.0 / masks.sum(1).clamp(min=1).float())[:, None].expand_as(masks).reshape(-1)[mask_indices]
    dim = cfg["embed_dim"]
    with torch.no_grad():
        teacher = losses.softmax_centered(losses.swap_crops(model.head(outputs["cls_224"])),
                                          zero_center, teacher_temp)
        dino = losses.dino_global_loss(model.head(outputs["cls_224_masked"]), teacher, student_temp)
        koleo = losses.koleo_loss(outputs["cls_224_masked"])
        teacher_patch = losses.softmax_centered(
            model.head(outputs["patch_224"].reshape(-1, dim).index_select(0, mask_indices)),
            zero_center, teacher_temp)
        student_patch = model.head(outputs["pmm_out"].reshape(-1, dim).index_select(0, mask_indices))
        patch = losses.masked_patch_loss(student_patch, teacher_patch, mask_weights, masks.shape[0], student_temp)
    assert_close_rel(dino, outputs["loss_dino_global"])
    assert_close_rel(koleo, outputs["loss_koleo"])
    assert_close_rel(patch, outputs["loss_patch_masked"])


def test_load_training_layout(fixture, tmp_path, model):
    checkpoint = fixture["checkpoint"]
    state = {}
    for key, value in checkpoint["teacher"].items():
        state[f"teacher.{key}"] = value
        state[f"student.{key}"] = value + 1.0  # must be ignored: the teacher is what we load
    for key, value in checkpoint["auxiliary"].items():
        state[f"auxiliary.{key}"] = value
    path = tmp_path / "train.pth"
    torch.save({"model": state, "iteration": 10}, path)
    loaded = load_reference(path, pmm_heads=8)
    assert loaded.source == "train"
    for ours, theirs in ((loaded.backbone, model.backbone), (loaded.head, model.head), (loaded.pmm, model.pmm)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name


def test_load_plain_dinov2_backbone(fixture, tmp_path):
    backbone_state = {k[len("backbone."):]: v for k, v in fixture["checkpoint"]["teacher"].items()
                      if k.startswith("backbone.")}
    path = tmp_path / "dinov2.pth"
    torch.save(backbone_state, path)
    loaded = load_reference(path)
    assert loaded.source == "dinov2" and loaded.head is None and loaded.pmm is None
    with torch.no_grad():
        tokens = loaded.backbone.forward_features(fixture["inputs"]["images_224"])
    assert_close_rel(tokens["patch"], fixture["outputs"]["patch_224"])


def test_missing_and_unexpected_keys_are_named(fixture, tmp_path):
    teacher = dict(fixture["checkpoint"]["teacher"])
    del teacher["backbone.blocks.1.ls2.gamma"]
    teacher["backbone.blocks.1.surprise"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"teacher": teacher}, path)
    with pytest.raises(CheckpointError) as info:
        load_reference(path)
    message = str(info.value)
    assert str(path) in message
    assert "blocks.1.ls2.gamma" in message and "missing" in message
    assert "blocks.1.surprise" in message and "unexpected" in message


def test_unknown_layout_and_missing_file_are_clear(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, path)
    with pytest.raises(CheckpointError, match="not a reference checkpoint"):
        load_reference(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_reference(tmp_path / "absent.pth")


def test_export_reference_round_trip_has_official_names(model, fixture, tmp_path):
    path = tmp_path / "out" / "teacher.pth"
    export_reference(model.backbone, path, head=model.head, pmm=model.pmm)
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pth"]  # no temporary left over
    written = torch.load(path, weights_only=True)
    for section in ("teacher", "auxiliary"):
        expected = {k: tuple(v.shape) for k, v in fixture["checkpoint"][section].items()}
        assert {k: tuple(v.shape) for k, v in written[section].items()} == expected
    reloaded = load_reference(path)  # head counts come back from tcore_meta
    inputs = fixture["inputs"]
    with torch.no_grad():
        for images in (inputs["images_224"], inputs["image_rect"]):
            a = reloaded.backbone.forward_features(images, None)
            b = model.backbone.forward_features(images, None)
            for key in a:
                assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    for ours, theirs in ((reloaded.head, model.head), (reloaded.pmm, model.pmm)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name


def test_export_safetensors_round_trip(model, fixture, tmp_path):
    path = tmp_path / "teacher.safetensors"
    export_safetensors(model.backbone, path, head=model.head, pmm=model.pmm)
    reloaded = load_reference(path)
    assert reloaded.source == "safetensors" and reloaded.pmm.num_heads == model.pmm.num_heads
    for ours, theirs in ((reloaded.backbone, model.backbone), (reloaded.head, model.head),
                         (reloaded.pmm, model.pmm)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
def test_official_layout_matches_official_keys(arch):
    """Our ViT-S/16 and ViT-B/16 + head + PMM map onto exactly the released key names and shapes."""
    expected = json.loads((REFERENCE / "official_keys.json").read_text())[arch]
    with torch.device("meta"):  # shapes only, no memory
        backbone = build_backbone(arch)
        head = DINOHead(backbone.embed_dim)
        pmm = PatchMatchingModule(backbone.embed_dim)
    checkpoint = official_checkpoint(backbone, head, pmm)
    ours = {f"teacher.{k}": list(v.shape) for k, v in checkpoint["teacher"].items()}
    ours.update({f"auxiliary.{k}": list(v.shape) for k, v in checkpoint["auxiliary"].items()})
    assert ours == expected


def test_load_fixture_bundle_reads_its_recorded_sizes(fixture):
    """The fixture file itself (checkpoint + config) loads, with the PMM's 8 heads from config."""
    bundle = load_reference(FIXTURE)
    assert bundle.pmm.num_heads == fixture["config"]["pmm_heads"]
    out = fixture["outputs"]
    with torch.no_grad():
        pmm_out = bundle.pmm(out["pmm_memory"], out["pmm_query"])
    torch.testing.assert_close(pmm_out, out["pmm_out"], rtol=1e-5, atol=1e-5)


def test_cls_position_is_a_parameter_of_its_own_as_in_the_reference(model, fixture, tmp_path):
    """The reference adds pos_embed[:, 0] to cls_token: two parameters, each stepped by AdamW.
    Ours are the same two (`cls_pos_embed`, `cls_token`), loaded and exported unchanged."""
    official = fixture["checkpoint"]["teacher"]
    assert torch.equal(model.backbone.cls_token, official["backbone.cls_token"])
    assert torch.equal(model.backbone.cls_pos_embed, official["backbone.pos_embed"][:, :1])
    path = tmp_path / "teacher.pth"
    export_reference(model.backbone, path, head=model.head, pmm=model.pmm)
    written = torch.load(path, weights_only=True)["teacher"]
    for key in ("backbone.cls_token", "backbone.pos_embed"):
        assert torch.equal(written[key], official[key]), key
    # A fresh backbone draws the cls position as timm draws pos_embed (trunc normal, std 0.02),
    # so the cls token starts at ~0.02, not at cls_token's ~1e-6.
    torch.manual_seed(0)
    fresh = build_backbone("vit_base")
    assert 0.018 < float(fresh.cls_pos_embed.detach().std()) < 0.022
    assert float(fresh.cls_token.detach().abs().max()) < 1e-4


def test_state_of_the_earlier_folded_layout_loads_as_the_same_network(model, fixture):
    """Before 2026-11-27 tcore folded the cls position into cls_token; such a state dict loads
    with a zero cls_pos_embed and gives the same tokens."""
    folded = dict(model.backbone.state_dict())
    folded["cls_token"] = folded["cls_token"] + folded.pop("cls_pos_embed")
    backbone = Backbone(**model.backbone.arch_kwargs).eval()
    backbone.load_state_dict(folded)
    assert torch.equal(backbone.cls_pos_embed, torch.zeros_like(backbone.cls_pos_embed))
    images = fixture["inputs"]["images_224"]
    with torch.no_grad():
        ours, theirs = backbone.forward_features(images), model.backbone.forward_features(images)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=1e-5), key
