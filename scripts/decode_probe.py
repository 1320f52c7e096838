"""Decode-only throughput of DALI's video decoder on a shard set: where the data pipeline's
time goes when the views are not the bottleneck (a diagnostic; figures for claims come from
`tcore bench data`).

    python scripts/decode_probe.py SHARDS [--configs mixed:8,cpu:8,cpu:16] [--batch 64]

Each configuration DEVICE:THREADS[:PIPELINES[:unpinned]] runs a pipeline that only reads the
clips and decodes three frames of each (PIPELINES of them at once, batch / PIPELINES each),
and prints samples/s and CPU milliseconds per sample as one JSON line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nvidia.dali import fn, pipeline_def

from tcore.bench.stats import samples_rate


@pipeline_def
def decode_only(tars, indices, ext, device, frames, affine):
    clip = fn.readers.webdataset(paths=tars, index_paths=indices, ext=[ext], name="Reader")
    extra = {"affine": affine} if device == "mixed" else {}
    return fn.decoders.video(clip, device=device, frames=frames, **extra)


def measure(shards: Path, device: str, batch: int, batches: int, threads: int, affine: bool,
            pipelines: int, frames: list[int]) -> dict:
    manifest = json.loads((shards / "manifest.json").read_text())
    tars = [str(shards / s["tar"]) for s in manifest["shards"]]
    indices = [str(shards / s["index"]) for s in manifest["shards"]]
    pipes = [decode_only(tars, indices, manifest["clip_ext"], device, frames, affine,
                         batch_size=batch, num_threads=threads, seed=k,
                         device_id=0 if device == "mixed" else None, prefetch_queue_depth=2)
             for k in range(pipelines)]
    for pipe in pipes:
        pipe.build()
    def one_round():  # every pipeline decodes a batch, concurrently
        for pipe in pipes:
            pipe.schedule_run()
        for pipe in pipes:
            outputs = pipe.outputs()
            if device == "mixed":
                outputs[0].as_cpu()  # wait for the GPU work
            pipe.release_outputs()

    for _ in range(2):  # warm-up: decoder sessions, allocations
        one_round()
    figures = samples_rate(lambda: [one_round() for _ in range(batches)],
                           batches * batch * pipelines)
    return {"device": device, "threads": threads, "affine": affine, "pipelines": pipelines,
            **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--configs", default="mixed:8,cpu:8,cpu:16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--frames", default="2,10,18", help="frame indices decoded per clip")
    args = parser.parse_args()
    frames = [int(f) for f in args.frames.split(",")]
    for config in args.configs.split(","):
        device, threads, *rest = config.split(":")
        pipelines = int(rest[0]) if rest else 1
        pinned = not (len(rest) > 1 and rest[1] == "unpinned")
        result = measure(args.shards, device, max(1, args.batch // pipelines), args.batches,
                         int(threads), pinned, pipelines, frames)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
