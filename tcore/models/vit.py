"""The DINOv2-style ViT backbone of T-CoRe, as a timm ``VisionTransformer``.

Reference configuration (METHOD.md section 4): 4 register tokens, LayerScale 1e-5, uniform
stochastic depth, learned positional embedding over [cls, patches] with the registers outside
it (timm ``no_embed_class=True`` for the patches, plus ``cls_pos_embed`` for the cls position),
dynamic image size with bicubic antialiased interpolation, and a learned ``mask_token`` that
replaces masked patch embeddings *before* the positional embedding is added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tcore.models.attention import Attention, ResolvesAttentionOnMove, set_attention_backend


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int


ARCHS = {
    "vit_tiny": ArchSpec(192, 2, 3),  # the reference fixture's size: CPU tests and the demo
    "vit_small": ArchSpec(384, 12, 6),
    "vit_base": ArchSpec(768, 12, 12),
    "vit_large": ArchSpec(1024, 24, 16),
}


class Backbone(ResolvesAttentionOnMove, VisionTransformer):
    """timm ViT with a mask token and a dict-returning ``forward_features``.

    Parameter names are timm's (``patch_embed.*``, ``cls_token``, ``reg_token``, ``pos_embed``,
    ``mask_token``, ``blocks.{i}.*``, ``norm.*``) plus ``cls_pos_embed``: the optimizer's
    layer-wise decay parses them.

    The cls token enters the blocks as ``cls_token + cls_pos_embed``, two parameters as in the
    reference (its ``pos_embed[:, 0]``), not one folded sum: AdamW steps each of them, so the
    sum moves as far per step as the reference's, and the cls position starts from the
    positional embedding's trunc-normal (std 0.02) draw as there.
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
                 img_size: int = 224, registers: int = 4, layerscale: float | None = 1e-5,
                 drop_path: float = 0.0, mlp_ratio: float = 4.0, attention: str = "auto") -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=True, init_values=layerscale or None, class_token=True,
            no_embed_class=True, reg_tokens=registers, dynamic_img_size=True,
            attn_layer=Attention,  # timm's default LayerNorm has the reference eps 1e-6
        )
        # Uniform stochastic depth (DINOv2 drop_path_uniform), not timm's linear ramp.
        for block in self.blocks:
            block.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
            block.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)   # as timm draws pos_embed
        self._register_load_state_dict_pre_hook(_unfolded_cls_position)
        self.num_blocks = depth
        self.num_registers = registers
        self.arch_kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                patch_size=patch_size, img_size=img_size, registers=registers,
                                layerscale=layerscale, mlp_ratio=mlp_ratio)
        set_attention_backend(self, attention)

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """timm's patch embedding [B, H, W, D] (its conv weights), computed as one matmul over
        the flattened patches: the 16x16 stride-16 conv ran as cuDNN's implicit-GEMM kernel at
        ~1 ms a call on an H100 (docs/PERFORMANCE.md), a matmul of this size takes microseconds.
        Sides must be multiples of the patch size, as timm requires."""
        proj = self.patch_embed.proj
        patch = proj.kernel_size[0]
        batch, channels, height, width = images.shape
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch "
                             f"size {patch}")
        rows, cols = height // patch, width // patch
        patches = images.reshape(batch, channels, rows, patch, cols, patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows, cols, -1)
        x = F.linear(patches, torch.flatten(proj.weight, 1), proj.bias)
        return self.patch_embed.norm(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's (no_embed_class, dynamic size): the positional embedding resampled to the
        grid and added, then the cls and register tokens in front."""
        batch, height, width, dim = x.shape
        trained = tuple(self.patch_embed.grid_size)
        # At the trained grid (224 px crops) no resampling, and no break in a compiled graph.
        pos_embed = (self.pos_embed if (height, width) == trained
                     else _resampled_pos_embed(self.pos_embed, (height, width), trained))
        x = x.reshape(batch, height * width, dim) + pos_embed
        cls = self.cls_token + self.cls_pos_embed
        prefix = [token.expand(batch, -1, -1) for token in (cls, self.reg_token)
                  if token is not None]
        return self.pos_drop(torch.cat(prefix + [x], dim=1))

    def embed(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, 1 + R + N, D] before the blocks: mask token, then positional embedding."""
        x = self.patch_tokens(images)  # [B, H, W, D] (dynamic size keeps the grid)
        if masks is not None:
            batch, height, width, dim = x.shape
            if masks.shape != (batch, height * width):
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the "
                                 f"{batch} x {height * width} patch grid")
            masked = masks.reshape(batch, height, width, 1)
            x = torch.where(masked, self.mask_token.to(x.dtype).reshape(1, 1, 1, dim), x)
        return self.norm_pre(self.patch_drop(self._pos_embed(x)))

    def forward_features(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """Final-norm tokens: ``{"cls": [B,D], "registers": [B,R,D], "patch": [B,N,D]}``."""
        x = self.embed(images, masks)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        first_patch = 1 + self.num_registers
        return {"cls": x[:, 0], "registers": x[:, 1:first_patch], "patch": x[:, first_patch:]}

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        return self.forward_features(images, masks)


def unfold_cls_position(state_dict: dict, prefix: str = "") -> None:
    """A state dict of the earlier layout (written by tcore before 2026-11-27) held the cls
    position folded into ``cls_token``: it gets a zero ``cls_pos_embed``, the same network.
    In place; a state dict of today's layout is left as it is."""
    cls_token = state_dict.get(f"{prefix}cls_token")
    if cls_token is not None and f"{prefix}cls_pos_embed" not in state_dict:
        state_dict[f"{prefix}cls_pos_embed"] = torch.zeros_like(cls_token)


def _unfolded_cls_position(state_dict, prefix, *_args) -> None:
    """`load_state_dict` pre-hook: :func:`unfold_cls_position` at the module's prefix."""
    unfold_cls_position(state_dict, prefix)


def _resampled_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                         trained_grid: tuple[int, int]) -> torch.Tensor:
    """timm's bicubic antialiased resampling of the positional embedding (`resample_abs_pos_
    embed`), as the linear map it is: rows [h, H] x grid [H, W, D] x columns [w, W], in
    float32 as timm does (equal to it within float32 rounding, ~5e-7 relative). Plain
    matmuls keep compiled graphs whole (timm's F.interpolate, traced with a symbolic grid,
    failed in its backward's meta function under FSDP2 + compile, PyTorch 2.14)."""
    height, width = trained_grid
    rows, cols = _grid_resampling(height, width, grid[0], grid[1], pos_embed.device)
    with torch.autocast(device_type=pos_embed.device.type, enabled=False):
        table = pos_embed.float().reshape(height, width, -1)
        out = torch.einsum("ah,hwd,bw->abd", rows, table, cols)
    return out.reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)


_RESAMPLING: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.library.custom_op("tcore::grid_resampling", mutates_args=())
def _grid_resampling(height: int, width: int, new_height: int, new_width: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The row [new_height, height] and column [new_width, width] float32 matrices of
    F.interpolate(bicubic, antialias) between the two grids, read off its response to
    every basis image (float64; the 2-D map is their product, which holds to 1e-16).
    Made once per sizes and device; opaque to torch.compile, so sizes may be symbolic."""
    key = (height, width, new_height, new_width, str(device))
    if key not in _RESAMPLING:
        basis = torch.eye(height * width, dtype=torch.float64).reshape(-1, 1, height, width)
        full = F.interpolate(basis, size=(new_height, new_width), mode="bicubic",
                             antialias=True, align_corners=False)
        full = full.reshape(height, width, new_height, new_width)
        rows = full.sum(dim=1)[:, :, 0].t().contiguous()   # each map column sums to 1
        cols = full.sum(dim=0)[:, 0, :].t().contiguous()
        _RESAMPLING[key] = (rows.float().to(device), cols.float().to(device))
    rows, cols = _RESAMPLING[key]
    return rows.clone(), cols.clone()     # an operator's outputs are its own tensors


@_grid_resampling.register_fake
def _grid_resampling_shapes(height, width, new_height, new_width, device):
    return (torch.empty(new_height, height, device=device),
            torch.empty(new_width, width, device=device))


def build_backbone(arch: str = "vit_small", *, patch_size: int = 16, drop_path: float = 0.1,
                   registers: int = 4, layerscale: float = 1e-5, attention: str = "auto",
                   img_size: int = 224) -> Backbone:
    """Build a preset backbone (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    return Backbone(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                    patch_size=patch_size, img_size=img_size, registers=registers,
                    layerscale=layerscale, drop_path=drop_path, attention=attention)
