"""Device names as tcore takes them: "gpu" is another name for "cuda".

Kept apart from the loader (which imports DALI) so that the commands' option checks
(`tcore.commands.check_torch_device`) and the benches (`tcore.bench.report.resolve_device`)
read a device name exactly as `build_loader` does.
"""
from __future__ import annotations


def torch_device_name(device) -> str:
    """'gpu' -> 'cuda', 'gpu:1' -> 'cuda:1'; any other name, or a torch.device, as torch
    names it (torch judges it)."""
    base, colon, index = str(device).partition(":")
    return f"cuda{colon}{index}" if base == "gpu" else str(device)
