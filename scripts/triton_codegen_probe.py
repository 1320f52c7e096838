"""Inductor's Triton code generation for the compiled train step, on a machine without a GPU
(a diagnostic: it finds compile-time failures of `train.compile=true` on CUDA before a lease).

    python scripts/triton_codegen_probe.py [--batch synthetic|loader] [--data SHARDS]
        [--arch vit_small] [--size 64] [--analysis default|on|off]

The step is built as `tcore bench` builds it (bf16, SDPA) and compiled with Inductor, whose
Triton backend is made to serve the CPU tensors. Inductor then schedules, fuses, tiles and
writes the Triton source of the forward and the backward graph as it does for CUDA, which is
where the H200 run of 2026-11-28 failed (an AssertionError in tiling_utils). The kernels
themselves cannot be built without a GPU: the probe hands Inductor placeholders instead, so
the run stops at the step's first kernel launch. It prints which sizes of the batch the step
traced as symbolic, whether code generation finished for each graph, and the error that
stopped it. `--batch loader` takes a batch from the DALI CPU loader (the training config's
pipeline, `--data` shards), the way `tcore bench train` feeds the step; `--analysis`
forces Inductor's coalesced-memory tiling analysis on or off.

    python scripts/triton_codegen_probe.py --graph colour_stage [--crops 128] [--crop-px 224]
        [--static]

`--graph colour_stage` writes the loader's GPU colour stage (`torch_photometric.colour_stage`,
the float32 divisions as on CUDA) for one view group instead, compiled for any shape or
(`--static`) for this one, and lists what the graph launches: each Triton kernel (and how
many of them split their index by sizes passed at run time) and each operator run outside
them.

It patches torch internals (checked with torch 2.11 and 2.14), so a newer torch may need it
adapted; it is not part of the tests. Inductor's caches are off for the run, so each graph
is generated anew.
"""
from __future__ import annotations

import argparse
import os
import traceback

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402


class Placeholder:
    """Stands for a compiled Triton kernel; has no `run`, so the first launch fails."""


def generate_triton_for_cpu(generated: list[int]) -> None:
    """Route CPU kernels to Inductor's Triton backend and stop short of compiling them."""
    import torch._functorch.config as functorch_config
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as triton_utils

    inductor_config.cpu_backend = "triton"
    # The kernel metadata names the Triton backend, which needs a GPU driver to ask.
    triton_utils.triton_hash_with_backend = lambda: "no-gpu-probe"
    async_compile.AsyncCompile.triton = lambda self, name, source, *a, **k: Placeholder()
    async_compile.AsyncCompile.wait = lambda self, scope: None
    # The backward graph generated with the forward, not at the first backward.
    functorch_config.force_non_lazy_backward_lowering = True
    original = scheduler.Scheduler.codegen

    def counted(self):
        result = original(self)
        generated.append(len(self.nodes))
        return result

    scheduler.Scheduler.codegen = counted


def first_batch(kind: str, data: str, cfg, size: int) -> dict:
    device = torch.device("cpu")
    if kind == "synthetic":
        from tcore.synthetic_batch import make_synthetic_batch
        return make_synthetic_batch(size, device)
    from tcore.bench.data import build_named_loader, close_loader
    from tcore.train import pipeline_config
    loader = build_named_loader("dali", data, device, 2, size, 0, config=pipeline_config(cfg))
    try:
        return next(iter(loader))
    finally:
        close_loader(loader)


def traced_symbolic_sizes(graph) -> dict[str, tuple]:
    return {node.name: tuple(node.meta["example_value"].shape)
            for node in graph.graph.nodes
            if node.op == "placeholder" and torch.is_tensor(node.meta.get("example_value"))
            and not all(isinstance(s, int) for s in node.meta["example_value"].shape)}


def probe_colour_stage(crops: int, size: int, static: bool) -> None:
    """Generate the colour stage's Triton code for one view group and list its launches."""
    import torch._inductor.config as inductor_config
    from torch._inductor.graph import GraphLowering
    from tcore.pipelines import torch_photometric as tp
    from tcore.pipelines.views import ROW_WIDTH, SWITCHES

    tp._f32_divide = tp._float32_quotient        # the CUDA path's divisions
    inductor_config.emulate_precision_casts = True
    generate_triton_for_cpu([])
    x = torch.randint(0, 256, (crops, 3, size, size), dtype=torch.uint8)
    rows = torch.rand(crops, ROW_WIDTH)
    switches = torch.ones(crops, len(SWITCHES), dtype=torch.bool)
    windows = torch.full((crops,), 9, dtype=torch.int64)
    stage = torch.compile(tp.colour_stage, dynamic=not static, fullgraph=True)
    sources: list[str] = []
    GraphLowering.save_output_code = sources.append     # what run_and_get_code hooks
    try:
        stage(x, rows, switches, windows, 9, 128, *tp.pil_rgb_to_hsv_tables())
    except Exception:     # the first launch of a placeholder kernel ends the run
        pass
    if not sources:
        raise SystemExit("no generated code captured (a torch without "
                         "GraphLowering.save_output_code?)")
    print(f"colour_stage, {crops} crops of {size} px, compiled for "
          f"{'this shape' if static else 'any shape'}:")
    describe_launches("\n".join(sources), list_kernels=True)


def describe_launches(source: str, list_kernels: bool) -> None:
    """What one generated graph launches: its Triton kernels (and how many of them split
    their index by sizes given at run time, 64-bit divisions on the GPU) and the operators
    run outside them."""
    import re

    call = source[source.index("def call(self, args)"):]
    kernels = re.findall(r"^\s*(triton_\w+)\.run\(", call, re.M)
    outside = re.findall(r"torch\.ops\.([\w.]+)\(", call)
    bodies = dict(re.findall(r"def (triton_\w+)\((.*?)\'\'\'", source, re.S))
    by_runtime_sizes = [k for k in kernels
                        if re.search(r"index (?://|%) ks\d", bodies.get(k, ""))]
    print(f"  {len(kernels)} Triton kernels, {len(by_runtime_sizes)} of them dividing the index "
          f"by sizes given at run time")
    for name in kernels if list_kernels else by_runtime_sizes:
        print("   ", name[:110], "(run-time sizes)" if name in by_runtime_sizes else "")
    print(f"  {len(outside)} operators outside them:", ", ".join(sorted(set(outside))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", choices=("synthetic", "loader"), default="synthetic")
    parser.add_argument("--data", default=".gpuframes")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--analysis", choices=("default", "on", "off"), default="default")
    parser.add_argument("--graph", choices=("train_step", "colour_stage"), default="train_step")
    parser.add_argument("--crops", type=int, default=128)
    parser.add_argument("--crop-px", type=int, default=224)
    parser.add_argument("--static", action="store_true")
    args = parser.parse_args()
    if args.graph == "colour_stage":
        probe_colour_stage(args.crops, args.crop_px, args.static)
        return

    from tcore.bench.model import bench_config, build_trainer
    # Compiled below, with a backend that records what dynamo traced before Inductor takes it.
    cfg = bench_config(args.arch, "sdpa", "bf16", False, args.size, torch.device("cpu"), 2, "")
    trainer = build_trainer(cfg, torch.device("cpu"))
    # The batch first: the loader's own compiled colour stage must run as it does in training.
    batch = first_batch(args.batch, args.data, cfg, args.size)

    generated: list[int] = []
    generate_triton_for_cpu(generated)
    if args.analysis != "default":
        import torch._inductor.config as inductor_config
        inductor_config.triton.coalesce_tiling_analysis = args.analysis == "on"
    from torch._inductor.compile_fx import compile_fx
    traced = []

    def recording_inductor(graph, example_inputs):
        traced.append(graph)
        return compile_fx(graph, example_inputs)

    from torch._inductor.graph import GraphLowering
    sources: list[str] = []
    GraphLowering.save_output_code = sources.append     # what run_and_get_code hooks

    trainer.forward = torch.compile(trainer.loss_module, backend=recording_inductor)
    try:
        trainer.step(0, batch)
        stopped = "the step ran (a GPU-less probe should not get here)"
    except Exception as error:  # the probe's point is to report whatever stops the compile
        stopped = "".join(traceback.format_exception_only(type(error), error)).strip()
        where = traceback.extract_tb(error.__traceback__)[-1]
        stopped = f"{stopped.splitlines()[0][:300]}  (raised in {where.filename}:{where.lineno})"
    for graph in traced:
        print("symbolic sizes traced:", traced_symbolic_sizes(graph) or "none")
    print("graphs generated (scheduler nodes):", generated or "none",
          "(forward and backward: 2 expected)")
    for source in sources:
        print("generated graph:")
        describe_launches(source, list_kernels=False)
    print("stopped by:", stopped)
    ok = len(generated) == 2 and "Placeholder" in stopped
    print("Triton code generation:", "PASSED" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
