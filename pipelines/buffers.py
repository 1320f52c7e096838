"""Reusable host memory for the batches the CPU loader hands out.

Why: a batch of T-CoRe views is tens of MB (batch 16: ~70 MB of float32). A fresh
allocation that large is a fresh mmap, and the first write to each of its pages is a page
fault the kernel must zero-fill: ~3 ms of CPU per sample, as much as a tenth of the whole
CPU pipeline (docs/PERFORMANCE.md). The pool keeps the storages of earlier batches and hands
one out again only once nothing else refers to it, i.e. the trainer has dropped every tensor
(and view, numpy array or saved autograd input) of that batch. GPU memory does not need
this: torch's caching allocator already reuses it.
"""
from __future__ import annotations

import torch

_POOL_REFERENCE = 1   # the pool's own reference to a storage
# A private torch function (present since torch 1.x); without it nothing can be proven free,
# so every batch gets fresh memory (correct, only slower).
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(storage: torch.UntypedStorage) -> int:
    if _USE_COUNT is None:
        return _POOL_REFERENCE + 1
    return _USE_COUNT(storage._cdata)


class HostBufferPool:
    """`empty(shape, dtype)`: a CPU tensor, backed by a free pooled storage when one fits.

    At most `capacity` storages are kept per (shape, dtype); beyond that a batch gets fresh
    memory, which is only slower."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._storages: dict[tuple, list[torch.UntypedStorage]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        kept = self._storages.setdefault(key, [])
        storage = next((s for s in kept if _storage_users(s) == _POOL_REFERENCE), None)
        if storage is None:
            tensor = torch.empty(shape, dtype=dtype)
            if len(kept) < self.capacity:
                kept.append(tensor.untyped_storage())
            return tensor
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def clear(self) -> None:
        self._storages.clear()
