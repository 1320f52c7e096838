"""Schedules at chosen iterations and the AdamW parameter groups of every ViT-S parameter
(METHOD.md section 6)."""
import copy
import math

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from tcore.config import load_config
from tcore.models import build_backbone
from tcore.optim import apply_schedules, backbone_layer_id, fuse_param_groups, tag_parameters
from tcore.schedules import CosineSchedule, build_schedules, scaled_base_lr

EPOCH = 100


# METHOD.md section 6 as it states the multipliers: the presets use the released code's
# effective 1.0, 1.0 and 0 (README, "Where tcore follows the released code"), which would
# leave the mechanisms below nothing to show.
AS_METHOD_MD_STATES = {"optim.layer_decay": 0.9, "optim.patch_embed_lr_mult": 0.2,
                       "optim.freeze_last_layer_epochs": 1}


def optim_cfg(preset="vits16_k400", **overrides):
    items = {"optim.official_epoch_length": EPOCH, "optim.epochs": 10, "optim.warmup_epochs": 2,
             "optim.warmup_teacher_temp_epochs": 3, **AS_METHOD_MD_STATES, **overrides}
    return load_config(preset, [f"{k}={v}" for k, v in items.items()]).optim


def test_the_presets_train_every_student_parameter_at_one_lr():
    """The released code's effective optimiser (its scheduler overwrites each group's lr with
    the plain lr): the paper presets build groups whose multipliers are all 1, and the head's
    last layer follows the lr from the first step; the PMM keeps its own schedule."""
    from tcore.optim import build_optimizer
    from tcore.ssl import TCoRe

    model = TCoRe({"arch": "vit_tiny", "img_size": 32, "head": {"prototypes": 16, "hidden": 16,
                                                                "bottleneck": 8}})
    for preset in ("vits16_k400", "vitb16_k400", "vits16_imagenet"):
        cfg = load_config(preset).optim
        optimizer = build_optimizer(model, cfg)
        assert {group["lr_multiplier"] for group in optimizer.param_groups} == {1.0}, preset
        s = build_schedules(cfg, global_batch=256)
        assert s.last_layer_lr[1] == s.lr[1] > 0 and s.last_layer_lr[0] == s.lr[0] == 0.0
        peak = int(s.lr.values.argmax())
        assert s.pmm_lr[peak] == pytest.approx(0.1 * s.lr[peak])


def test_sqrt_batch_scaling():
    assert scaled_base_lr(0.002, 1024) == pytest.approx(0.002)
    assert scaled_base_lr(0.002, 256) == pytest.approx(0.001)
    assert scaled_base_lr(0.002, 4 * 64) == pytest.approx(0.002 * math.sqrt(0.25))


def test_lr_schedule_warmup_and_cosine():
    s = build_schedules(optim_cfg(), global_batch=256)  # peak lr 0.002 * sqrt(1/4) = 0.001
    peak, floor = 0.001, 1e-6
    assert s.total_iters == 1000
    assert s.lr[0] == 0.0                                     # warm-up starts from 0
    assert s.lr[100] == pytest.approx(peak * 100 / 199)       # linspace(0, peak, 200)
    assert s.lr[199] == pytest.approx(peak)                   # warm-up ends on the peak
    assert s.lr[200] == pytest.approx(peak)                   # cosine starts at the peak
    assert s.lr[600] == pytest.approx((peak + floor) / 2)     # cosine middle (400 of 800)
    assert s.lr[999] == pytest.approx(floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * 799 / 800)))
    assert s.lr[1000] == floor and s.lr[10 ** 6] == floor     # past the end: final value
    assert all(s.lr[i] >= s.lr[i + 1] for i in range(200, 999))


def test_pmm_and_last_layer_schedules():
    s = build_schedules(optim_cfg(), global_batch=256)
    assert s.pmm_lr[199] == pytest.approx(0.0001)             # warm-up to lr * 0.1
    assert s.pmm_lr[600] == pytest.approx((0.0001 + 1e-6) / 2)  # its own cosine to 1e-6
    assert s.pmm_lr[1000] == 1e-6
    assert all(s.last_layer_lr[i] == 0.0 for i in range(EPOCH))  # frozen for epoch 1
    assert s.last_layer_lr[EPOCH] == pytest.approx(s.lr[EPOCH]) and s.lr[EPOCH] > 0
    assert s.last_layer_lr[700] == s.lr[700]


def test_weight_decay_momentum_and_teacher_temperature():
    s = build_schedules(optim_cfg(), global_batch=256)
    assert s.weight_decay[0] == pytest.approx(0.04)
    assert s.weight_decay[500] == pytest.approx(0.22)
    assert s.weight_decay[1000] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.992)
    assert s.momentum[500] == pytest.approx(0.996)
    assert s.momentum[1000] == 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04)           # linear ramp over 3 epochs
    assert s.teacher_temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.teacher_temp[299] == pytest.approx(0.07)
    assert s.teacher_temp[300] == pytest.approx(0.07) and s.teacher_temp[5000] == pytest.approx(0.07)


def test_teacher_temperature_ramp_longer_than_run():
    # The published default: a 30-epoch ramp; it must not be cut by a shorter run.
    s = build_schedules(optim_cfg(**{"optim.warmup_teacher_temp_epochs": 30}), global_batch=64)
    assert s.teacher_temp[1500] == pytest.approx(0.04 + 0.03 * 1500 / 2999)


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="total_iters"):
        CosineSchedule(1.0, 0.0, 0)
    with pytest.raises(ValueError, match="warm-up"):
        CosineSchedule(1.0, 0.0, 10, warmup_iters=11)


# --- parameter groups -------------------------------------------------------------------

class HeadLike(nn.Module):
    """The DINO head's parameter layout: mlp.{0,2,4} + weight-normalised last_layer."""

    def __init__(self, dim=384, hidden=64, bottleneck=32, prototypes=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, x):
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


class PMMLike(nn.Module):
    """The Patch Matching Module's layout: cross-attn, self-attn, linear, three LayerNorms."""

    def __init__(self, dim=384):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, 16, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, 16, batch_first=True)
        self.linear = nn.Linear(dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)


@pytest.fixture(scope="module")
def vit_small_parts():
    return build_backbone("vit_small"), HeadLike(), PMMLike()


def expected_backbone_tag(name):
    """The multipliers METHOD.md section 6 gives, written out per name pattern."""
    if name.startswith("patch_embed."):
        lr = 0.9 ** 13 * 0.2
    elif name in ("cls_token", "cls_pos_embed", "reg_token", "pos_embed", "mask_token"):
        lr = 0.9 ** 13
    elif name.startswith("blocks."):
        lr = 0.9 ** (12 - int(name.split(".")[1]))   # block i is layer i + 1 of 13
    else:
        assert name.startswith("norm."), name          # the final norm sits with the head
        lr = 1.0
    no_decay = name.endswith(".bias") or ".norm" in name or name.startswith("norm.") \
        or name.endswith(".gamma")
    return lr, 0.0 if no_decay else 1.0


def test_every_vit_small_parameter_gets_its_multipliers(vit_small_parts):
    backbone, head, pmm = vit_small_parts
    tagged = tag_parameters(backbone, head, pmm, layer_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {tag.name: tag for _, tag in tagged}
    all_names = ([f"backbone.{n}" for n, _ in backbone.named_parameters()]
                 + [f"head.{n}" for n, _ in head.named_parameters()]
                 + [f"pmm.{n}" for n, _ in pmm.named_parameters()])
    assert sorted(by_name) == sorted(all_names)                 # every parameter, once
    assert len(tagged) == len(all_names)
    for name, _ in backbone.named_parameters():
        lr, wd = expected_backbone_tag(name)
        tag = by_name[f"backbone.{name}"]
        assert tag.lr_multiplier == pytest.approx(lr, rel=1e-12), name
        assert tag.wd_multiplier == wd, name
        assert tag.schedule == "lr", name
    # spot checks written out by hand
    assert by_name["backbone.blocks.0.attn.qkv.weight"].lr_multiplier == pytest.approx(0.9 ** 12)
    assert by_name["backbone.blocks.11.mlp.fc2.weight"].lr_multiplier == pytest.approx(0.9)
    assert by_name["backbone.blocks.5.ls2.gamma"].wd_multiplier == 0.0
    assert by_name["backbone.blocks.5.norm2.weight"].wd_multiplier == 0.0
    assert by_name["backbone.cls_token"].wd_multiplier == 1.0
    assert by_name["backbone.cls_pos_embed"].wd_multiplier == 1.0     # as the reference's
    assert by_name["backbone.cls_pos_embed"].lr_multiplier == pytest.approx(0.9 ** 13)  # pos_embed
    for name, _ in head.named_parameters():
        tag = by_name[f"head.{name}"]
        assert tag.lr_multiplier == 1.0
        assert tag.schedule == ("last_layer" if name.startswith("last_layer") else "lr")
        assert tag.wd_multiplier == (0.0 if name.endswith("bias") else 1.0), name
    for name, _ in pmm.named_parameters():
        tag = by_name[f"pmm.{name}"]
        assert (tag.lr_multiplier, tag.schedule) == (1.0, "pmm")  # no layer decay
        assert tag.wd_multiplier == (0.0 if ("bias" in name or name.startswith("norm")) else 1.0), name


def test_backbone_layer_ids():
    assert backbone_layer_id("pos_embed", 12) == 0
    assert backbone_layer_id("patch_embed.proj.weight", 12) == 0
    assert backbone_layer_id("blocks.0.attn.qkv.bias", 12) == 1
    assert backbone_layer_id("blocks.11.ls1.gamma", 12) == 12
    assert backbone_layer_id("norm.weight", 12) == 13


def test_groups_fuse_by_multipliers_and_apply_schedules(vit_small_parts):
    backbone, head, pmm = vit_small_parts
    groups = fuse_param_groups(tag_parameters(backbone, head, pmm, layer_decay=0.9,
                                              patch_embed_lr_mult=0.2))
    keys = [(round(g["lr_multiplier"], 12), g["wd_multiplier"], g["schedule"]) for g in groups]
    assert len(keys) == len(set(keys))
    # 13 backbone layers + patch-embed variants + head + last layer + PMM, decay / no decay
    assert 30 <= len(groups) <= 36
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    s = build_schedules(optim_cfg(), global_batch=256)
    for it in (0, 150, 600):
        values = apply_schedules(optimizer, s, it)
        for g in optimizer.param_groups:
            base = {"lr": values["lr"], "last_layer": values["last_layer_lr"],
                    "pmm": values["pmm_lr"]}[g["schedule"]]
            assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
            assert g["weight_decay"] == pytest.approx(values["weight_decay"] * g["wd_multiplier"])
            if g["schedule"] == "last_layer":
                assert (g["lr"] == 0.0) == (it < EPOCH)


def test_last_layer_frozen_during_first_epoch():
    """A real AdamW step in epoch 1 moves everything except the head's last layer."""
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                 reg_tokens=4, no_embed_class=True, init_values=1e-5,
                                 num_classes=0)
    head, pmm = HeadLike(dim=32, hidden=16, bottleneck=8, prototypes=16), PMMLike(dim=32)
    groups = fuse_param_groups(tag_parameters(backbone, head, pmm, layer_decay=0.9,
                                              patch_embed_lr_mult=0.2))
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    s = build_schedules(optim_cfg(**{"optim.warmup_epochs": 0}), global_batch=256)
    params = {f"{p}.{n}": t for p, m in (("backbone", backbone), ("head", head), ("pmm", pmm))
              for n, t in m.named_parameters()}

    def step(it):
        before = {n: t.detach().clone() for n, t in params.items()}
        apply_schedules(optimizer, s, it)
        optimizer.zero_grad()
        tokens = backbone.forward_features(torch.randn(2, 3, 32, 32))
        out = pmm.linear(pmm.cross_attn(tokens, tokens, tokens)[0])
        (head(out[:, 0]).logsumexp(-1).sum() + pmm.norm3(out).sum() * 0).backward()
        optimizer.step()
        return {n: not torch.equal(before[n], t.detach()) for n, t in params.items()}

    moved = step(EPOCH - 1)
    assert not moved["head.last_layer.parametrizations.weight.original0"]
    assert not moved["head.last_layer.parametrizations.weight.original1"]
    assert moved["backbone.blocks.1.attn.qkv.weight"] and moved["head.mlp.0.weight"]
    assert moved["pmm.linear.weight"]
    moved = step(EPOCH)
    assert moved["head.last_layer.parametrizations.weight.original1"]


def _adamw_pair_groups(seed: int, device: str):
    """Three groups of parameters (different shapes), twice with the same values."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [[(5, 3), (7,)], [(4, 4, 2)], [(3,), (2, 6), (1,)]]
    made = []
    for _ in range(2):
        gen.manual_seed(seed)
        made.append([[nn.Parameter(torch.randn(*s, generator=gen).to(device)) for s in group]
                     for group in shapes])
    return made


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_listed_adamw_steps_exactly_as_torchs_fused_adamw(device):
    """ListedAdamW (the CUDA optimizer) against torch.optim.AdamW(fused=True) (on the CPU
    with its fused kernel too): the same parameters and states, bit for bit, over steps
    whose lr and weight decay change per group, through a state_dict round trip and a step
    with a missing gradient (torch's own step then)."""
    from tcore.optim import ListedAdamW

    ours_params, theirs_params = _adamw_pair_groups(0, device)
    kwargs = dict(lr=0.0, weight_decay=0.0, betas=(0.9, 0.999), fused=True)
    ours = ListedAdamW([{"params": p} for p in ours_params], **kwargs)
    theirs = torch.optim.AdamW([{"params": p} for p in theirs_params], **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        for k, (a, b) in enumerate(zip(ours.param_groups, theirs.param_groups)):
            a["lr"] = b["lr"] = 1e-2 * (k + 1) / (step + 1)
            a["weight_decay"] = b["weight_decay"] = 0.04 * (step + 1)
        for mine, other in zip(sum(ours_params, []), sum(theirs_params, [])):
            mine.grad = torch.randn(mine.shape, generator=gen).to(device)
            other.grad = mine.grad.clone()
        if step == 4:                                   # a missing gradient
            ours_params[1][0].grad = theirs_params[1][0].grad = None
        if step == 3:                                   # a checkpoint round trip
            ours.load_state_dict(ours.state_dict())
        ours.step()
        theirs.step()
        for mine, other in zip(sum(ours_params, []), sum(theirs_params, [])):
            assert torch.equal(mine, other), step
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ours.state[mine][key], theirs.state[other][key]), key
    assert len(ours._listed) == 3                     # the lists are kept between steps
    twin = copy.deepcopy(ours)                        # a copy lists its own tensors afresh
    assert twin._listed == {}
    twin.step()
    empty = ListedAdamW([{"params": []}], **kwargs)   # nothing to step is no error
    empty.step()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_listed_adamw_under_a_gradient_scaler_skips_inf_steps_as_torch_does(device):
    """The fp16 step (scale, backward, unscale_ for clipping, scaler.step, update) with
    ListedAdamW against torch.optim.AdamW(fused=True): bit for bit, including a step whose
    gradients hold an inf (both leave parameters, moments and step counts as they were),
    and on the listed path, not torch's step, after the first."""
    from tcore.optim import ListedAdamW

    class CountingListedAdamW(ListedAdamW):
        listed_steps = 0

        def _fused_step(self, plans, found_inf):
            self.listed_steps += 1
            super()._fused_step(plans, found_inf)

    ours_params, theirs_params = _adamw_pair_groups(2, device)
    kwargs = dict(lr=1e-2, weight_decay=0.04, betas=(0.9, 0.999), fused=True)
    ours = CountingListedAdamW([{"params": p} for p in ours_params], **kwargs)
    theirs = torch.optim.AdamW([{"params": p} for p in theirs_params], **kwargs)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0 ** 10) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        weights = [torch.randn(p.shape, generator=gen).to(device) for p in sum(ours_params, [])]
        if step == 3:
            weights[2][0] = float("inf")               # this step's gradients overflow
        before = [p.detach().clone() for p in sum(ours_params, [])]
        for params, optimizer, scaler in zip((ours_params, theirs_params), (ours, theirs),
                                             scalers):
            loss = sum((p * w).sum() for p, w in zip(sum(params, []), weights))
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)
        after = [p.detach() for p in sum(ours_params, [])]
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == (step == 3), step
        for mine, other in zip(sum(ours_params, []), sum(theirs_params, [])):
            assert torch.equal(mine, other), step
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ours.state[mine][key], theirs.state[other][key]), (step, key)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert float(ours.state[ours_params[0][0]]["step"]) == 5      # the inf step not counted
    assert ours.listed_steps == 5                                  # all but the first


def test_build_optimizer_steps_the_student_and_pmm_with_the_configs_adamw():
    """The optimizer `tcore train` builds: AdamW with the config's betas and torch's default
    eps (the reference's), over exactly the trainable student and PMM parameters (never the
    teacher's), each once, tagged with the config's layer decay."""
    from tcore.optim import build_optimizer
    from tcore.ssl import TCoRe

    model = TCoRe({"arch": "vit_tiny", "img_size": 32, "head": {"prototypes": 16, "hidden": 16,
                                                                "bottleneck": 8}})
    cfg = optim_cfg(**{"optim.adamw_beta2": 0.95, "optim.layer_decay": 0.8})
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    expected = list(model.student.parameters()) + list(model.pmm.parameters())
    assert len(stepped) == len(expected) == len({id(p) for p in stepped})
    assert {id(p) for p in stepped} == {id(p) for p in expected}
    patch = [g for g in optimizer.param_groups
             if any(n.startswith("backbone.patch_embed.") for n in g["names"])]
    assert patch and all(g["lr_multiplier"] == pytest.approx(0.8 ** 3 * 0.2) for g in patch)
