"""The DINO projection head (METHOD.md section 4), shared by cls and patch tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with classic weight normalisation, ``W = g * V / ||V||_row``.

    Stored as ``weight_g`` [out, 1] and ``weight_v`` [out, in] like ``nn.utils.weight_norm``
    (the reference layout), computed with the same fused op.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # default init for V
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1), Linear to bottleneck), L2-normalise, weight-normed
    prototypes. ``last_layer`` is what "freeze last layer" refers to."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for index in range(nlayers):
            layers.append(nn.Linear(dims[index], dims[index + 1]))
            if index < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.hidden_dim, self.bottleneck_dim, self.nlayers = hidden_dim, bottleneck_dim, nlayers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # DINOv2 uses a larger eps in float16 so the normalisation cannot divide by zero.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
