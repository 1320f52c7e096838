"""The CUDA stream the training loop runs on (`train.step_stream`).

Why: on a GPU the loader's colour stage runs on a stream of its own beside the train step
(`tcore.pipelines.loader`). Both streams have the default priority, so when the loader's
kernels are queued the device shares its blocks between them, and the step's kernels wait
behind the loader's. On a stream of higher priority the step's blocks go first and the
loader's fill the step's gaps (the ~10% of a step the device sits idle, docs/PERFORMANCE.md).
"high_priority" runs the loop (next() and the step both, so the loader's hand-over makes the
step's stream wait for the batch) on a stream of the device's highest priority; "default"
keeps the current stream. Which batches and which arithmetic are unchanged either way, only
the order the device runs the two streams' kernels in.
"""
from __future__ import annotations

import contextlib

STEP_STREAMS = ("default", "high_priority")
HIGHEST_PRIORITY = -1000


def check_step_stream(kind: str) -> None:
    if kind not in STEP_STREAMS:
        raise ValueError(f"train.step_stream must be one of {STEP_STREAMS}, got {kind!r}")


@contextlib.contextmanager
def step_stream(kind: str, device):
    """Run the block on the stream `kind` names (yields it, or None where nothing changes:
    "default", or a device other than CUDA). The stream waits for the work queued before
    the block, and the caller's stream for the block's work after it."""
    check_step_stream(kind)
    if kind == "default" or device.type != "cuda":
        yield None
        return
    import torch     # here: `tcore.config` reads STEP_STREAMS and does not import torch

    caller = torch.cuda.current_stream(device)
    # Lower is higher; a value past the device's range gets its highest (torch.cuda.Stream).
    stream = torch.cuda.Stream(device, priority=HIGHEST_PRIORITY)
    stream.wait_stream(caller)     # the model, a resumed state: made on the caller's stream
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        caller.wait_stream(stream)
