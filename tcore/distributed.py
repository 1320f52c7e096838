"""Process-group set-up for torchrun (one process per GPU; the CPU run is world size 1).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process and
no process group is created. GPUs use NCCL, CPUs gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """The environment asks for several processes but does not say how to join them."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` -> the local GPU when there is one, else the CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        from tcore.config import ConfigError   # a config choice this machine cannot meet
        raise ConfigError("train.device=cuda but no CUDA device is visible (no GPU or no "
                          "driver); use train.device=auto or cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it, else 1."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise DistributedSetupError(f"WORLD_SIZE={text!r} in the environment: not a number of "
                                    "processes; unset it (or give --world-size to --dry-run)")
    return int(text)


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; return rank, world size, device."""
    world_size = env_world_size()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world_size > 1 and missing:
        # Some schedulers export WORLD_SIZE for their own use; torch's error is a traceback.
        raise DistributedSetupError(f"WORLD_SIZE={world_size} but no {' or '.join(missing)} in "
                                    "the environment: launch with torchrun (it sets them), or "
                                    "unset WORLD_SIZE for one process")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor)
        tensor /= info.world_size
    return tensor


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
