"""The loaders' call arguments as tcore takes them: device names ("gpu" is another name for
"cuda"), seeds and output dtypes.

Kept apart from the DALI loader (which imports DALI) so that the baseline loader, the
commands' option checks (`tcore.commands.check_torch_device`) and the benches
(`tcore.bench.report.resolve_device`, the bench settings) read them exactly as
`build_loader` does.
"""
from __future__ import annotations

# DALI takes a seed below 2**31; numpy's generators refuse negative ones.
MAX_SEED = 2**31 - 1


def torch_device_name(device) -> str:
    """'gpu' -> 'cuda', 'gpu:1' -> 'cuda:1'; any other name, or a torch.device, as torch
    names it (torch judges it)."""
    base, colon, index = str(device).partition(":")
    return f"cuda{colon}{index}" if base == "gpu" else str(device)


def check_seed(seed, name: str = "seed") -> None:
    """`seed` is an integer DALI and numpy take, named here rather than in DALI's words."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} = {seed!r}: must be an integer from 0 to 2**31 - 1")


def check_dtype(dtype) -> None:
    """The views are normalised floats: an integer dtype would truncate them silently."""
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype = {dtype!r}: must be torch.float32, torch.float16 or "
                         "torch.bfloat16")
