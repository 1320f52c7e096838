"""FLOP counting and model-FLOPs utilisation (MFU) for `tcore bench model`.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and the
attention kernels it knows; elementwise work is not counted, as is usual for MFU). The peak is
not a datasheet number: it is the dense matmul rate measured on the same device in the same
run, so MFU compares the step with what this card actually sustains.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from tcore.bench.stats import time_repeats

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(run_once: Callable[[], object]) -> int:
    """FLOPs executed by one call of `run_once` (forward and backward if it runs both)."""
    with FlopCounterMode(display=False) as counter:
        run_once()
    return int(counter.get_total_flops())


def matmul_flops(m: int, k: int, n: int) -> int:
    """Analytic FLOPs of an [m,k] @ [k,n] product: one multiply and one add per term."""
    return 2 * m * k * n


def vit_block_forward_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Analytic forward FLOPs of one pre-norm ViT block for one sequence of `tokens`.

    qkv projection (3 D^2), attention scores and weighted sum (2 T D each, per token),
    output projection (D^2), MLP (2 * ratio * D^2); all times 2 FLOPs per multiply-add.
    """
    hidden = int(dim * mlp_ratio)
    linear = matmul_flops(tokens, dim, 3 * dim) + matmul_flops(tokens, dim, dim)
    attention = matmul_flops(tokens, dim, tokens) * 2  # Q K^T and A V, summed over heads
    mlp = matmul_flops(tokens, dim, hidden) + matmul_flops(tokens, hidden, dim)
    return linear + attention + mlp


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def peak_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """The matmul dtype MFU is measured against.

    On a GPU the reference is always the dense half-precision tensor-core rate (bf16, or fp16
    for fp16 runs), so an fp32 step shows how far it is from what the card can do. On the CPU
    there is no half-precision fast path worth the name, so the step's own dtype is used.
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {sorted(PRECISION_DTYPES)}")
    if device.type == "cuda":
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return PRECISION_DTYPES[precision]


def default_matmul_size(device: torch.device) -> int:
    # Big enough to saturate the tensor cores on an H100; small enough for 2 shared CPU cores.
    return 8192 if device.type == "cuda" else 1024


def measure_matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: int | None = None,
    repeats: int = 5,
    iterations: int | None = None,
) -> dict:
    """Dense square matmul rate (FLOP/s) on `device`: the best of `repeats` timed rounds.

    The best round, not the median, is the figure: a peak is what the device can reach, and
    slower rounds are interference from other work on the machine.
    """
    size = size or default_matmul_size(device)
    iterations = iterations or (20 if device.type == "cuda" else 3)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = time_repeats(
        lambda: torch.mm(a, b, out=out),
        warmup=2,
        repeats=repeats,
        iterations=iterations,
        synchronize=synchronizer(device),
    )
    flops = matmul_flops(size, size, size)
    return {
        "flops_per_s": flops / min(seconds),
        "median_flops_per_s": flops / sorted(seconds)[len(seconds) // 2],
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "iterations": iterations,
    }
