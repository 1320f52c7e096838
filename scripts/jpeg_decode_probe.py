"""Decode-only throughput of DALI's image decoder on JPEG-frame shards (`--codec jpegs`): the
three drawn frames of each sample decoded and nothing else, to tell whether nvJPEG bounds
the loader's stage B (a diagnostic; figures for claims come from `tcore bench data`).

    python scripts/jpeg_decode_probe.py SHARDS [--configs mixed:16:three,mixed:16:one]
        [--batch 64] [--batches 8]

The samples and their drawn frames come from the loader's own stage A. Each configuration
DEVICE:THREADS:LAYOUT decodes them as stage B does ("three": three decoders of a batch each,
past / current / future) or as one decoder over all three frames of the batch ("one", batch
3 x B), and prints samples/s and CPU milliseconds per sample as one JSON line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types

from tcore.bench.stats import samples_rate
from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.manifest import load_shard_set
from tcore.pipelines.stage_a import StageA, StageASpec, initial_state
from tcore.pipelines.views import FRAME_JPEG_FEEDS, frame_feeds


@pipeline_def
def decode_only(device: str, inputs: int):
    return tuple(fn.decoders.image(fn.external_source(name=f"jpeg{k}", dtype=types.UINT8, ndim=1),
                                   device=device, output_type=types.RGB)
                 for k in range(inputs))


def drawn_jpegs(shards: Path, batch: int, batches: int) -> list[dict[str, list]]:
    """Per batch, the past / current / future JPEG bytes stage A chose (the loader's draws)."""
    shard_set = load_shard_set([shards])
    if shard_set.kind != "frames":
        raise SystemExit(f"{shards}: holds {shard_set.kind} shards; this probe needs "
                         f"`tcore shards build --codec jpegs` ones")
    spec = StageASpec(shard_set=shard_set, batch_size=batch, config=PipelineConfig(), seed=0,
                      shard_id=0, num_shards=1, infinite=True,
                      samples_per_epoch=shard_set.total_samples, state={})
    spec.state = initial_state(spec, reader=None)
    stage_a = StageA(spec)
    feeds = []
    for _ in range(batches):
        host = stage_a.next_batch()
        data = [s.data for s in host.samples]
        feeds.append(frame_feeds(data, [s.frame_offsets for s in host.samples], host.params))
    return feeds


def measure(feeds: list[dict[str, list]], device: str, threads: int, layout: str) -> dict:
    batch = len(feeds[0][FRAME_JPEG_FEEDS[0]])
    one = layout == "one"
    pipe = decode_only(device, 1 if one else 3, batch_size=3 * batch if one else batch,
                       num_threads=threads, device_id=0 if device == "mixed" else None,
                       prefetch_queue_depth=1)
    pipe.build()

    def run(batch_feeds: dict, wait: bool) -> None:
        if one:
            pipe.feed_input("jpeg0", [j for name in FRAME_JPEG_FEEDS for j in batch_feeds[name]])
        else:
            for k, name in enumerate(FRAME_JPEG_FEEDS):
                pipe.feed_input(f"jpeg{k}", batch_feeds[name])
        pipe.schedule_run()
        outputs = pipe.outputs()
        if wait and device == "mixed":
            outputs[0][0].as_cpu()   # DALI's GPU work runs in order: the last batch is done
        pipe.release_outputs()

    for batch_feeds in feeds[:2]:    # warm-up: decoder state, allocations
        run(batch_feeds, wait=True)
    figures = samples_rate(lambda: [run(batch_feeds, wait=k == len(feeds) - 1)
                                    for k, batch_feeds in enumerate(feeds)],
                           len(feeds) * batch)
    return {"device": device, "threads": threads, "layout": layout, "batch": batch, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--configs", default="mixed:16:three,mixed:16:one")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args()
    feeds = drawn_jpegs(args.shards, args.batch, args.batches)
    if args.out:
        args.out.write_text("")
    for config in args.configs.split(","):
        device, threads, layout = config.split(":")
        if layout not in ("three", "one"):
            raise SystemExit(f"layout must be 'three' or 'one', got {layout!r} in {config!r}")
        line = json.dumps(measure(feeds, device, int(threads), layout))
        print(line, flush=True)
        if args.out:   # line by line: a run cut short by a time cap keeps what it measured
            with args.out.open("a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
