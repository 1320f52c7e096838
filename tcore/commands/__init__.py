"""The click commands of `tcore`, one module per command group (wired in `tcore.cli`)."""
import os

import click


def shard_paths(ctx, param, values) -> list[str]:
    """`--data` callback: the option repeated and/or comma-separated, as one list of paths
    (the same for every command, so `--data A --data B` never silently keeps only B)."""
    for value in values:
        if "," in str(value) and os.path.exists(value):
            raise click.BadParameter(f"{value}: a path with a comma, which --data reads as a "
                                     "separator between shard directories; rename it (or link "
                                     "to it under a name without one)")
    paths = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    for path in paths:
        if not os.path.exists(path):
            raise click.BadParameter(f"{path}: no such file or directory")
    return paths


def check_torch_device(ctx, param, value):
    """`--device` callback of the commands that run on the CPU or a CUDA GPU (eval,
    pipeline preview): refuse a name torch cannot parse, another kind of device, or CUDA
    where none is usable, before anything is loaded (torch's own errors come later, as raw
    tracebacks). Returns the name torch takes: `gpu[:i]` is `cuda[:i]`, as in `tcore bench`."""
    if value is None:
        return None
    import torch

    from tcore.pipelines.arguments import torch_device_name

    name = torch_device_name(value)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as error:
        raise click.BadParameter(f"{value!r} is not a torch device (e.g. cuda, cuda:1, cpu): "
                                 f"{error}") from error
    if device.type not in ("cpu", "cuda"):
        # torch parses mps, meta, xpu, ...
        raise click.BadParameter(f"{value!r}: this command runs on cpu or cuda (cuda:N), not "
                                 f"{device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value!r} needs a GPU, but CUDA is not available here "
                                     "(no GPU or no driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value!r}: only {torch.cuda.device_count()} GPU(s) "
                                     "visible")
    return name
