"""Multi-head attention with selectable kernels.

Backends:
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only, when its kernels load);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on CUDA, the
  CPU path here);
- ``math``: explicit ``softmax(Q K^T / sqrt(d)) V``, the slow baseline for benchmarks;
- ``auto``: ``xformers`` on CUDA when it works, else ``sdpa``.

The backend actually used is logged once per (requested backend, device type).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")
_resolved: dict[tuple[str, str], str] = {}
_xformers_ok: dict[str, bool] = {}


def xformers_available(device="cuda") -> bool:
    """True when xFormers imports *and* its kernel runs on ``device`` (cached per device type).

    xFormers may import while its compiled kernels do not match the installed torch (see
    MEASUREMENTS.md), and it has no CPU operator, so we run one tiny call to find out.
    """
    device = torch.device(device)
    device_type = device.type
    if device_type in _xformers_ok:
        return _xformers_ok[device_type]
    ok = False
    if device_type == "cuda" and torch.cuda.is_available():
        try:
            import xformers.ops as xops  # noqa: WPS433 (optional dependency)

            q = torch.zeros(1, 4, 1, 8, device=device, dtype=torch.float16)
            xops.memory_efficient_attention(q, q, q)
            ok = True
        except Exception as error:  # import error, missing operator, kernel load failure
            _logger.info("xFormers unusable on %s (%s: %s)", device_type, type(error).__name__, error)
    _xformers_ok[device_type] = ok
    return ok


def resolve_backend(requested: str, device) -> str:
    """Map a requested backend to the one that runs on ``device`` (a device or its type;
    cached per device type, logged once).

    Modules resolve eagerly when they are built or moved (see ``warm_backend``), so inside a
    step (and under torch.compile) this is a dictionary lookup.
    """
    device_type = device if isinstance(device, str) else torch.device(device).type
    key = (requested, device_type)
    if key in _resolved:
        return _resolved[key]
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    backend = requested
    if requested in ("auto", "xformers"):
        probe = device if not isinstance(device, str) else device_type
        backend = "xformers" if xformers_available(probe) else "sdpa"
        if requested == "xformers" and backend != "xformers":
            _logger.warning("attention backend 'xformers' cannot run on %s; falling back to sdpa", device_type)
    _logger.info("attention backend: %s (requested %s, device %s)", backend, requested, device_type)
    _resolved[key] = backend
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit attention on [B, H, N, d] tensors (the benchmark baseline)."""
    weights = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    weights = weights.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Attention on [B, N, H, d] tensors, returns [B, N, H, d]."""
    backend = resolve_backend(backend, q.device.type)
    if backend == "xformers":
        import xformers.ops as xops  # noqa: WPS433

        return xops.memory_efficient_attention(q, k, v, p=dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:
        out = math_attention(q, k, v, dropout_p)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """ViT self-attention (timm parameter names ``qkv`` and ``proj``) with a backend switch.

    The constructor accepts timm's ``attn_layer`` keyword arguments so timm's ``Block`` can build
    it; q/k normalisation is not part of the reference and is refused.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, backend: str = "auto", **_unused) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if qk_norm or scale_norm:
            raise ValueError("qk_norm / scale_norm are not supported by tcore's Attention")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not used by the T-CoRe backbone")
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        out = multi_head_attention(q, k, v, self.backend, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.reshape(batch, tokens, dim)))


class MultiheadAttention(nn.Module):
    """Cross/self attention with ``nn.MultiheadAttention``'s parameter layout.

    (``in_proj_weight`` [3D, D], ``in_proj_bias`` [3D], ``out_proj``), so the reference PMM's
    weights load unchanged, but computed with fused kernels. Attention weights (averaged over
    heads) are computed only when asked for.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                return_attention: bool = False):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        if return_attention:
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            weights = ((qh * self.head_dim ** -0.5) @ kh.transpose(-2, -1)).softmax(dim=-1)
            out = (weights @ vh).transpose(1, 2)
            attention = weights.mean(dim=1)
        else:
            out = multi_head_attention(q, k, v, self.backend)
            attention = None
        out = self.out_proj(out.reshape(query.shape[0], query.shape[1], -1))
        return (out, attention) if return_attention else out


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Switch every tcore attention layer inside ``module`` to ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for layer in module.modules():
        if isinstance(layer, (Attention, MultiheadAttention)):
            layer.backend = backend
    warm_backend(module)


def warm_backend(module: nn.Module) -> None:
    """Resolve (and log) the backends of ``module``'s attention layers for its current device,
    outside any compiled region."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        return
    for backend in {layer.backend for layer in module.modules()
                    if isinstance(layer, (Attention, MultiheadAttention))}:
        resolve_backend(backend, parameter.device)


class ResolvesAttentionOnMove:
    """Mixin: resolve the attention backend again after ``.to()`` / ``.cuda()``."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        warm_backend(self)
        return result


__all__ = ["Attention", "MultiheadAttention", "BACKENDS", "resolve_backend", "xformers_available",
           "set_attention_backend", "warm_backend", "ResolvesAttentionOnMove", "math_attention", "multi_head_attention"]
