"""The GPU colour stage of a view group replayed as a CUDA graph
(`PipelineConfig.photometric_graphs`).

Why: on an H200 (docs/PERFORMANCE.md, 2026-11-28) the compiled colour stage cost the host
~16 ms of the loader's `next()` per batch of 64, about 3 ms per view group (Python, guards,
a custom-op blur and a few dozen kernel launches), four groups a batch. That host time capped
the loader at ~2,950 samples/s and was most of the eager training loop's 13% data wait. A graph
captured once per input shape replays the group's kernels with one launch.

How: the first batch of a shape runs the stage a few times on a side stream (the compile,
cuDNN's choices and the allocator settle), then captures one call. Each batch after that is
copied into the graph's fixed input tensors, the graph replays, and its output is copied out,
all on the caller's stream (the loader's work stream), so the next replay cannot overwrite a
batch already handed out. The pixels are the ungraphed stage's: the same kernels run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Calls before the capture: the first compiles; the others let lazy set-up (kernel loading,
# autotuning, cuDNN's workspace) happen outside it, as the CUDA graph documentation asks.
WARMUP_CALLS = 3

# The stage: (uint8 crops, rows float32, switches bool, windows int64) -> finished crops.
Stage = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]   # the tensors the graph reads: crops, rows, switches, windows
    output: torch.Tensor               # the tensor it writes


class ColourStageGraphs:
    """`stage` on CUDA tensors, captured once per input shape and replayed after that."""

    def __init__(self, stage: Stage):
        self._stage = stage
        self._captured: dict[tuple, _Captured] = {}

    @property
    def captured_shapes(self) -> int:
        return len(self._captured)

    def __call__(self, crops: torch.Tensor, rows: np.ndarray, switches: np.ndarray,
                 windows: np.ndarray, may_capture: bool = True) -> torch.Tensor:
        """The stage's output for these crops; a shape not captured yet is captured, or,
        with `may_capture` false, run as launched (the same kernels, so the same pixels)."""
        host = (np.ascontiguousarray(rows, np.float32), np.ascontiguousarray(switches, np.bool_),
                np.ascontiguousarray(windows, np.int64))
        key = (tuple(crops.shape), crops.dtype, tuple(array.shape for array in host))
        captured = self._captured.get(key)
        if captured is None and not may_capture:
            return self._stage(crops, *_on_device(host, crops.device))
        if captured is None:
            captured = self._captured[key] = self._capture(crops, host)
        captured.inputs[0].copy_(crops)
        for static, array in zip(captured.inputs[1:], host):
            # Pinned, so the upload does not hold the host; the caching host allocator keeps
            # the pinned block until the copy is done.
            static.copy_(torch.from_numpy(array).pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, crops: torch.Tensor, host: tuple[np.ndarray, ...]) -> _Captured:
        device = crops.device
        caller = torch.cuda.current_stream(device)
        # This batch's values, so the warm-up calls compute on valid parameters.
        inputs = (crops.clone(), *_on_device(host, device))
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._stage(*inputs)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's own threads keep using the GPU while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self._stage(*inputs)
        return _Captured(graph, inputs, output)


def _on_device(host: tuple[np.ndarray, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The stage's parameters (rows, switches, windows) as tensors on `device`."""
    return tuple(torch.from_numpy(array).to(device) for array in host)
