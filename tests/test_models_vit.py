"""Backbone, attention backends, DINO head and PMM behaviour (CPU; GPU checks skip with a reason)."""
import logging

import pytest
import torch
from timm.layers import DropPath

from tcore.models import (ARCHS, DINOHead, PatchMatchingModule, build_backbone,
                          set_attention_backend)
from tcore.models import attention
from tcore.models.attention import multi_head_attention, resolve_backend

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", drop_path=0.0, img_size=64).eval()
    with torch.no_grad():  # a non-zero mask token so masking is visible
        backbone.mask_token.normal_()
    return backbone


def test_presets_and_parameter_names():
    with torch.device("meta"):
        for arch, spec in ARCHS.items():
            backbone = build_backbone(arch)
            assert (backbone.embed_dim, backbone.num_blocks) == (spec.embed_dim, spec.depth)
    backbone = build_backbone("vit_tiny")
    names = set(dict(backbone.named_parameters()))
    for name in ("patch_embed.proj.weight", "cls_token", "cls_pos_embed", "reg_token", "pos_embed",
                 "mask_token", "blocks.0.attn.qkv.weight", "blocks.1.ls2.gamma", "norm.weight"):
        assert name in names
    assert backbone.reg_token.shape == (1, 4, 192) and backbone.pos_embed.shape == (1, 196, 192)
    assert backbone.cls_pos_embed.shape == (1, 1, 192)
    assert torch.allclose(backbone.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert torch.equal(backbone.mask_token, torch.zeros(1, 192))   # DINOv2 starts it at 0


def test_stochastic_depth_is_uniform():
    with torch.device("meta"):
        backbone = build_backbone("vit_small", drop_path=0.1)
    rates = [b.drop_path1.drop_prob for b in backbone.blocks] + [b.drop_path2.drop_prob for b in backbone.blocks]
    assert all(isinstance(b.drop_path1, DropPath) for b in backbone.blocks)
    assert rates == [0.1] * 24


def test_forward_shapes_any_size(tiny):
    with torch.no_grad():
        square = tiny.forward_features(torch.randn(2, 3, 64, 64))
        rect = tiny.forward_features(torch.randn(1, 3, 48, 96))
    assert square["cls"].shape == (2, 192) and square["registers"].shape == (2, 4, 192)
    assert square["patch"].shape == (2, 16, 192) and rect["patch"].shape == (1, 18, 192)


def test_patch_tokens_are_timms_conv_embedding_and_positions_timms(tiny):
    """The patch embedding as one matmul equals timm's conv (its own weights), and the
    positional embedding step equals timm's, at the trained grid and resampled, plus the cls
    position on the cls token."""
    from timm.models.vision_transformer import VisionTransformer

    for shape in ((2, 3, 64, 64), (1, 3, 48, 96)):
        images = torch.randn(*shape)
        with torch.no_grad():
            ours = tiny.patch_tokens(images)
            assert torch.allclose(ours, tiny.patch_embed(images), atol=1e-5, rtol=1e-5)
            expected = VisionTransformer._pos_embed(tiny, ours)
            expected[:, 0] += tiny.cls_pos_embed[0]
            assert torch.allclose(tiny._pos_embed(ours), expected, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tiny.patch_tokens(torch.randn(1, 3, 64, 60))


def test_resampled_positions_compile_whole_with_timms_gradient():
    """Off the trained grid the positional embedding is two matmuls (no graph break in a
    compiled backbone call), and its gradient is that of timm's F.interpolate."""
    from timm.layers import resample_abs_pos_embed

    from tcore.models.vit import _resampled_pos_embed

    backbone = build_backbone("vit_tiny", img_size=224, drop_path=0.0)
    images = torch.randn(2, 3, 96, 96)
    explained = torch._dynamo.explain(lambda x: backbone.forward_features(x)["patch"])(images)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    weights = torch.randn(1, 36, backbone.embed_dim)
    grads = []
    for resample in (lambda p: _resampled_pos_embed(p, (6, 6), (14, 14)),
                     lambda p: resample_abs_pos_embed(p, new_size=[6, 6], old_size=[14, 14],
                                                      num_prefix_tokens=0)):
        table = backbone.pos_embed.detach().clone().requires_grad_(True)
        (resample(table) * weights).sum().backward()
        grads.append(table.grad)
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-6


def test_masking_replaces_patch_embeddings_before_positions(tiny):
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        plain = tiny.forward_features(images)
        none_masked = tiny.forward_features(images, torch.zeros_like(masks))
        masked = tiny.forward_features(images, masks)
        # The mask token sits where the patch embedding was, positions are added afterwards:
        embedded = tiny.embed(images, masks)
        expected = tiny.mask_token[0] + tiny.pos_embed[0, :5]
    assert torch.equal(plain["patch"], none_masked["patch"])
    assert not torch.allclose(masked["patch"][0], plain["patch"][0])
    assert torch.allclose(masked["patch"][1], plain["patch"][1], atol=1e-6)  # crop 2 unmasked
    assert torch.allclose(embedded[0, 5:10], expected, atol=1e-6)  # after cls + 4 registers
    with pytest.raises(ValueError, match="patch grid"):
        tiny.forward_features(images, torch.zeros(2, 15, dtype=torch.bool))


def test_attention_backends_agree_in_float32(tiny):
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    with torch.no_grad():
        for backend in ("sdpa", "math", "auto"):
            set_attention_backend(tiny, backend)
            outputs[backend] = tiny.forward_features(images)["patch"]
    set_attention_backend(tiny, "auto")
    assert torch.allclose(outputs["sdpa"], outputs["math"], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs["sdpa"], outputs["auto"])  # auto is SDPA on the CPU


def test_auto_and_xformers_fall_back_to_sdpa_on_cpu(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_resolved", {})  # forget earlier resolutions
    caplog.set_level(logging.INFO, logger="tcore.models.attention")
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("xformers", "cpu") == "sdpa"  # no CPU operator: falls back
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention backend:")]
    assert chosen == ["attention backend: sdpa (requested auto, device cpu)",
                      "attention backend: sdpa (requested xformers, device cpu)"]  # once each
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash9", "cpu")


def _bf16_attention_error(backend: str) -> float:
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 197, 6, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = multi_head_attention(q.float(), k.float(), v.float(), "math")
    return (multi_head_attention(q, k, v, backend).float() - reference).abs().max().item()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 fused attention)")
def test_attention_backends_agree_in_bf16_on_gpu():
    for backend in ("sdpa", "math", "auto"):
        assert _bf16_attention_error(backend) < 2e-2, backend


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_xformers_agrees_with_the_reference_in_bf16_on_gpu():
    from tcore.models.attention import xformers_available

    if not xformers_available("cuda"):  # e.g. a wheel built for another torch: it falls back
        pytest.skip("xFormers' kernels do not load with this torch")
    assert resolve_backend("xformers", "cuda") == "xformers"
    assert _bf16_attention_error("xformers") < 2e-2


def test_dino_head_shapes_and_weight_norm():
    head = DINOHead(192, out_dim=512, hidden_dim=256, bottleneck_dim=64)
    names = set(dict(head.named_parameters()))
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= names
    assert head(torch.randn(3, 192)).shape == (3, 512)
    # Row norms of the effective weight equal weight_g (classic weight norm, dim 0).
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    row_norms = head.last_layer.weight.norm(dim=1, keepdim=True)
    assert torch.allclose(row_norms, head.last_layer.weight_g, atol=1e-6)


def test_pmm_attention_weights_only_when_asked():
    torch.manual_seed(0)
    pmm = PatchMatchingModule(64, num_heads=4, depth=2).eval()
    memory, query = torch.randn(2, 10, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        out = pmm(memory, query)
        out_with, weights = pmm(memory, query, return_attention=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 64)
    assert torch.allclose(out, out_with, atol=1e-5)
    assert weights.shape == (2, 7, 10) and torch.allclose(weights.sum(-1), torch.ones(2, 7), atol=1e-5)


def test_pmm_formula_with_torch_multihead_attention():
    """One PMM block equals the METHOD.md formula written with nn.MultiheadAttention."""
    torch.manual_seed(1)
    dim, heads = 32, 4
    pmm = PatchMatchingModule(dim, num_heads=heads, attn_mul=4.0).eval()
    block = pmm.blocks[0]
    cross = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    selfa = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    cross.load_state_dict(block.cross_attn.state_dict())
    selfa.load_state_dict(block.self_attn.state_dict())
    memory, query = torch.randn(2, 9, dim), torch.randn(2, 5, dim)
    with torch.no_grad():
        h1 = block.norm1(4.0 * cross(query, memory, memory, need_weights=False)[0] + query)
        h2 = block.norm2(selfa(h1, h1, h1, need_weights=False)[0] + h1)
        expected = block.norm3(block.linear(h2) + h2)
        assert torch.allclose(pmm(memory, query), expected, atol=1e-5)


def test_dino_head_starts_as_dinov2s():
    """MLP weights trunc-normal std 0.02 with zero biases; the prototypes' weight_g starts
    at 1 (METHOD.md section 4), not at the row norms of weight_v."""
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=512, hidden_dim=256, bottleneck_dim=64)
    assert torch.equal(head.last_layer.weight_g, torch.ones(512, 1))
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for layer in linears:    # >= 16k entries each: the sample std is within 5% of 0.02
        assert 0.019 < float(layer.weight.detach().std()) < 0.021
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_pmm_blocks_are_chained_over_the_same_memory():
    """A deeper PMM feeds each block's output to the next block as its query, with the same
    memory tokens at every block."""
    torch.manual_seed(2)
    pmm = PatchMatchingModule(32, num_heads=4, depth=2).eval()
    memory, query = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        first, _ = pmm.blocks[0](memory, query)
        second, weights = pmm.blocks[1](memory, first, return_attention=True)
        out, out_weights = pmm(memory, query, return_attention=True)
    assert torch.allclose(out, second, atol=1e-6)
    assert torch.allclose(out_weights, weights, atol=1e-6)
    assert not torch.allclose(out, first, atol=1e-3)
