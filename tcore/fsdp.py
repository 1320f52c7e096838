"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for T-CoRe: sharding and full state dicts.

Sharding units, innermost first: every transformer block of the student and of the teacher
backbone, then each backbone, each DINO head, the PMM, and the TCoRe model as the root.
Student and teacher are sharded alike (same units, same mesh, dim-0 shards), so the teacher
EMA pairs each local student shard with the matching local teacher shard and needs no
communication. Buffers (the DINO centers) are not sharded; they stay all-reduced in
`losses.update_center`.

FSDP2 gathers a unit's parameters around `forward` only; the backbones are called through
`forward_features` and the root through `forward_losses`, so those methods are registered
as forward methods too. In one step the student backbone runs once without gradients
(past and future crops) and twice with them (global, then local crops); FSDP2 gathers its
parameters for every call, and its post-backward hook reduce-scatters whatever gradient has
accumulated, adding to the sharded gradient if it fires more than once. The teacher only
runs under no_grad: gathered for its forward, resharded after, never reduced.

`torch.compile` of the loss module works on top: Dynamo does not trace FSDP2's hooks (they
run eagerly between the compiled graphs).

Checkpoints hold full (unsharded) tensors in the same layout as DDP and single-process runs:
the model as `TCoRe.state_dict()` keys, the optimizer in `torch.optim.Optimizer.state_dict()`
layout (integer parameter ids in param-group order). Both are gathered with
`torch.distributed.checkpoint.state_dict` and arrive on rank 0 only (on the CPU).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

# Full tensors gathered onto rank 0's CPU (the other ranks get empty dicts).
GATHER_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank holds the whole checkpoint (it reads per-rank loader and RNG state from the same
# file anyway) and cuts its own shards out of it: no broadcast needed.
LOAD_FROM_FULL = StateDictOptions(full_state_dict=True)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@torch.no_grad()
def broadcast_from_rank0_(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (what DDP does when it wraps).

    Each rank initialises its model from its own seed; fully_shard keeps each rank's slice of
    its own copy, so without this the shards would come from different initialisations.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor, src=0)


def _shard_backbone(backbone: nn.Module, mesh) -> None:
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(backbone, mesh=mesh)
    register_fsdp_forward_method(backbone, "forward_features")


def _silence_view_output_warning() -> None:
    # forward_features returns slices of one token tensor (cls / registers / patch). FSDP2
    # warns that an in-place op on such a view would bypass its pre-backward hook; nothing
    # in forward_losses modifies backbone outputs in place (the FSDP test matches DDP).
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"FSDP2-wrapped module \(FSDPBackbone\) returned a view")


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a `tcore.ssl.TCoRe` in place over all ranks (see the module docstring).

    Build the optimizer afterwards: its parameters must be the sharded (DTensor) ones.
    """
    _silence_view_output_warning()
    broadcast_from_rank0_(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for network in (model.student, model.teacher):
        _shard_backbone(network["backbone"], mesh)
        fully_shard(network["head"], mesh=mesh)
    fully_shard(model.pmm, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "forward_losses")
    return model


# ---------------------------------------------------------------------- full state dicts
def full_model_state(module: nn.Module) -> dict:
    """`module.state_dict()` with full CPU tensors on rank 0, {} elsewhere (collective)."""
    return get_model_state_dict(module, options=GATHER_TO_RANK0)


def load_full_model_state(module: nn.Module, state: dict) -> None:
    """Load a full state dict (the same on every rank) into the sharded module."""
    set_model_state_dict(module, dict(state), options=LOAD_FROM_FULL)


def gathered_copy(module: nn.Module, build_empty: Callable[[], nn.Module]) -> nn.Module | None:
    """An unsharded CPU copy of a sharded module on rank 0, None elsewhere (collective).

    `build_empty()` builds the same architecture; it runs on the meta device (no memory, no
    initialisation) and the gathered tensors are assigned into it."""
    state = full_model_state(module)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        replica = build_empty()
    replica.load_state_dict(state, strict=True, assign=True)
    return replica


def _optimizer_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: position i is parameter id i of its
    `state_dict()`."""
    name_of = {id(param): name for name, param in model.named_parameters()}
    return [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _fqn_keyed_to_native(state: dict, fqns: list[str]) -> dict:
    index = {fqn: i for i, fqn in enumerate(fqns)}
    groups = [{**group, "params": [index[fqn] for fqn in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {index[fqn]: value for fqn, value in state["state"].items()},
            "param_groups": groups}


def _native_to_fqn_keyed(state: dict, fqns: list[str]) -> dict:
    groups = [{**group, "params": [fqns[i] for i in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {fqns[i]: value for i, value in state["state"].items()},
            "param_groups": groups}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` layout with full CPU tensors on rank 0, {} elsewhere
    (collective)."""
    state = get_optimizer_state_dict(model, optimizer, options=GATHER_TO_RANK0)
    if not state or not state.get("param_groups"):
        return {}
    return _fqn_keyed_to_native(state, _optimizer_fqns(model, optimizer))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Load an `optimizer.state_dict()`-layout dict of full tensors into the sharded optimizer."""
    keyed = _native_to_fqn_keyed(state, _optimizer_fqns(model, optimizer))
    set_optimizer_state_dict(model, optimizer, keyed, options=LOAD_FROM_FULL)


__all__ = ["shard_model", "is_sharded", "broadcast_from_rank0_", "full_model_state",
           "gathered_copy", "load_full_model_state", "full_optimizer_state",
           "load_full_optimizer_state"]
