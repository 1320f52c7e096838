"""Stage A of the loader: read the shards and decide every random choice of each batch.

A small checkpointable DALI CPU pipeline around `fn.readers.webdataset` (shuffling, sharding
by rank) reads raw samples; the host then draws each sample's parameters (the uniforms of
a per-sample seed: base seed, shard, sample counter; `sampling.params_from_uniforms` over
the whole batch, the same as `sampling.draw_sample_params` one by one) and
the batch's masks from a per-batch seed. The samples form one stream of passes (epochs):
each hands out this rank's samples once, in an order of its own (the reference draws a new
permutation of the data every epoch, and DALI's reader repeats its order): runs of the
shards permuted and read through index files written for them (`ReaderPasses`), or a data
set within the shuffle buffer held and permuted in memory (`MemoryPasses`). Batches run on
across the end of a pass. A `HostBatch` carries the loader state after it (the pass, the
place in it, the reader's checkpoint and the two counters), so a resumed run redraws
exactly what an uninterrupted one would. Nothing here touches a GPU: `producer.py` runs it
in a thread or in a process of its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
from nvidia.dali import fn, pipeline_def

from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.manifest import ShardSet
from tcore.pipelines.masks import batch_masks
from tcore.pipelines.sampling import (SampleParams, drawn_frames, params_from_uniforms,
                                      sample_rng, sample_uniforms)

STATE_VERSION = 2           # 1: one reader for every epoch, no pass in the state
MASK_STREAM = 0x6D61736B   # separates the masks' random stream from the samples'
PASS_STREAM = 0x70617373   # ... and each pass's shard order and reader seed


class BadSampleError(RuntimeError):
    """A sample that cannot be read or decoded; the message names its shard and key."""


@dataclass
class RawSample:
    data: np.ndarray
    meta: dict
    label: int
    source: str          # "<tar path>:<offset>:<key>.<ext>" from DALI's source_info
    frame_offsets: np.ndarray | None = None   # "frames" shards: where each JPEG starts / ends


@dataclass
class HostBatch:
    """Everything of one batch decided on the host, plus the loader state after it."""
    samples: list[RawSample]
    params: list[SampleParams]
    masks: np.ndarray
    state_after: dict
    batch_number: int
    skipped: list = field(default_factory=list)
    seconds: float = 0.0     # wall time stage A took for it (read, parse, draws, masks)


@dataclass
class StageASpec:
    """What stage A needs to start (picklable: a producer process is built from it)."""
    shard_set: ShardSet
    batch_size: int
    config: PipelineConfig
    seed: int
    shard_id: int
    num_shards: int
    infinite: bool
    samples_per_epoch: int
    state: dict          # where to start: `initial_state` or a saved loader state
    data_id: str = ""    # `data_identity(shard_set)`, kept in every state
    # Where the runs' index files go (`writes_run_indices`): a directory the loader owns and
    # removes (a producer process ends by SIGKILL, so it could not), else one of StageA's own.
    workdir: str | None = None


def data_identity(shard_set: ShardSet) -> str:
    """A short hash of what the shard directories hold (per directory: kind, codec, T, the
    inputs' hash the builder recorded, each shard's name, samples and bytes), not of where
    they are: a resumed run may read moved or copied shards, but not other ones."""
    described = [{"kind": m.get("kind"), "codec": m.get("codec"), "frames": m.get("frames"),
                  "inputs": (m.get("options") or {}).get("inputs_sha256"),
                  "shards": [[e.get("tar"), e.get("samples"), e.get("bytes")]
                             for e in m.get("shards", [])]}
                 for m in shard_set.manifests]
    text = json.dumps(described, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial_state(owner, reader) -> dict:
    """The loader state before any batch. `owner`: anything with `seed`, `shard_id`,
    `num_shards`, `batch_size`, `config` and `data_id` (the loader, a StageASpec); `reader`:
    a reader checkpoint or None (the reader's start)."""
    return {"version": STATE_VERSION, "reader": reader, "pass": 0, "pass_position": 0,
            "samples_seen": 0, "batches_seen": 0, "seed": owner.seed, "shard_id": owner.shard_id,
            "num_shards": owner.num_shards, "batch_size": owner.batch_size,
            "shuffle_buffer": owner.config.shuffle_buffer,
            "data": owner.data_id}


# --- the reader ----------------------------------------------------------------------------

@pipeline_def(enable_checkpointing=True)
def _reader_pipeline(tars, indices, extensions, shuffle, initial_fill, reader_seed, shard_id,
                     num_shards, pad_last_batch, missing):
    data, meta, label = fn.readers.webdataset(
        paths=tars, index_paths=indices, ext=[";".join(extensions), "json", "cls"],
        random_shuffle=shuffle, initial_fill=initial_fill, seed=reader_seed, shard_id=shard_id,
        num_shards=num_shards, pad_last_batch=pad_last_batch,
        missing_component_behavior=missing, name="Reader")
    return data, meta, label


def pass_reading_order(shard_set: ShardSet, seed: int, pass_index: int, chunk: int = 0,
                       workdir: str | None = None) -> tuple[list[str], list[str], int]:
    """The order pass `pass_index` reads the data in: (tars, index files, reader seed). Every
    shard is cut into runs of `chunk` consecutive samples (0: whole shards) and the runs of
    all shards are put in a seeded permutation of the pass's own, the same on every rank
    (ranks split the permuted list), with a reader seed of its own. So the shuffle buffer
    holds samples of many shards at once, a sample meets other batch-mates each epoch, and
    shard directories given together are mixed from the first batch."""
    rng = sample_rng(seed, pass_index, PASS_STREAM)
    runs = [(shard, start, min(start + (chunk or count), count))
            for shard, count in enumerate(shard_set.shard_samples)
            for start in range(0, count, chunk or count)]
    runs = [runs[i] for i in rng.permutation(len(runs))]
    reader_seed = int(rng.integers(0, 2 ** 31 - 1))
    return ([shard_set.tars[shard] for shard, _, _ in runs],
            _run_indices(shard_set, runs, workdir), reader_seed)


def _run_indices(shard_set: ShardSet, runs: list, workdir: str | None) -> list[str]:
    """An index file per run: its shard's own for a whole shard, else one written under
    `workdir` with the run's lines (DALI reads a tar's samples at the offsets its index
    gives, so such an index reads just the run)."""
    paths = [shard_set.indices[shard] if (start, stop) == (0, shard_set.shard_samples[shard])
             else None for shard, start, stop in runs]
    cut = sorted((shard, k) for k, (shard, _, _) in enumerate(runs) if paths[k] is None)
    if cut and workdir is None:
        raise ValueError("runs shorter than a shard need a workdir for their index files")
    lines, lines_of = [], None
    for shard, k in cut:                 # shard by shard: one index in memory at a time
        if lines_of != shard:
            with open(shard_set.indices[shard]) as handle:
                lines, lines_of = handle.read().split("\n")[1:], shard   # [0]: the header
        _, start, stop = runs[k]
        paths[k] = os.path.join(workdir, f"run-{k:07d}.idx")
        with open(paths[k], "w") as handle:
            handle.write(f"v1.2 {stop - start}\n" + "\n".join(lines[start:stop]) + "\n")
    return paths


def build_reader(shard_set: ShardSet, config: PipelineConfig, batch_size: int, seed: int,
                 shard_id: int, num_shards: int, pass_index: int = 0, checkpoint=None,
                 as_listed: bool = False, workdir: str | None = None):
    """The reader of one pass (`pass_reading_order`, its run index files written under
    `workdir`), restored from `checkpoint` when given, or (`as_listed`) of the shards as
    listed, unshuffled; a reader error that only cites an index line is re-raised naming
    the shard and sample key. It pads its last batch with repeats, which `StageA` leaves
    out: a pass is this rank's samples once each."""
    if as_listed:
        tars, indices, reader_seed = list(shard_set.tars), list(shard_set.indices), seed
    else:
        tars, indices, reader_seed = pass_reading_order(shard_set, seed, pass_index,
                                                        config.pass_chunk, workdir)
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    pipe = _reader_pipeline(
        tars=tars, indices=indices, extensions=shard_set.extensions,
        shuffle=config.shuffle_buffer > 1 and not as_listed,
        initial_fill=config.shuffle_buffer,
        reader_seed=reader_seed, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, missing="skip" if config.skip_bad_samples else "error",
        batch_size=batch_size, num_threads=1, device_id=None, seed=seed,
        prefetch_queue_depth=2, **kwargs)
    try:
        pipe.build()
    except RuntimeError as error:
        raise BadSampleError(_explain_reader_error(str(error), dict(zip(indices, tars)))
                             ) from None
    return pipe


# Lines of DALI's error text around the cause (its wrappers, not what went wrong).
_DALI_WRAPPERS = ("Critical error in pipeline:", "Critical error when building pipeline:",
                  "Current pipeline object is no longer valid.")


def dali_error_reason(message: str) -> str:
    """The cause in a DALI error's text: what follows "encountered:" up to its C++ context
    (else the lines that are not DALI's wrappers), without an `Assert on "..." failed:`
    prefix; the whole text when nothing is left."""
    text = message.split("encountered:", 1)[1] if "encountered:" in message else message
    lines = []
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("C++ context:"):
            break
        if line and line not in _DALI_WRAPPERS:
            lines.append(line)
    reason = " ".join(lines) or message.strip()
    return re.sub(r'^Assert on ".*?" failed: ', "", reason)


def _explain_reader_error(message: str, tar_of_index: dict | None = None) -> str:
    """Name the shard and sample key of a reader error that only cites an index line (of a
    shard's index, or of a run's: `tar_of_index` says whose)."""
    found = re.search(r'index file at "([^"]+)" line (\d+)', message)
    detail = message.strip().splitlines()
    reason = next((line for line in detail if "detected" in line or "missing" in line.lower()),
                  None) or dali_error_reason(message)
    if not found:
        return f"reading shards failed: {reason}"
    index, line = found.group(1), int(found.group(2))
    try:
        with open(index) as handle:
            fields = handle.read().split("\n")[line].split()     # line 0 is the header
        key = fields[3].rsplit(".", 1)[0]
    except (OSError, IndexError):
        key = f"line {line} of {index}"
    tar = (tar_of_index or {}).get(index) or (
        index[: -len(".idx")] + ".tar" if index.endswith(".idx") else index)
    return (f"sample {tar}:{key}: a component is missing ({reason.strip()}); rebuild the "
            "shard or pass skip_bad_samples=True / --skip-bad-samples")


# --- one sample ----------------------------------------------------------------------------

def sample_frames(meta: dict) -> int:
    """T of one sample from its json (images: 1)."""
    value = meta.get("T", meta.get("frames"))
    return int(value) if value else 1


def frame_offsets(meta: dict, size: int, source: str) -> np.ndarray:
    """Start / end offsets of the T JPEG frames of a "frames" sample, checked against its
    component's size."""
    sizes = meta.get("frame_bytes")
    if (not isinstance(sizes, list) or len(sizes) != sample_frames(meta)
            or not all(type(s) is int and s > 0 for s in sizes) or sum(sizes) != size):
        raise BadSampleError(f"sample {source}: its .json 'frame_bytes' does not describe the "
                             f"{size}-byte frames component ({sample_frames(meta)} frames)")
    return np.cumsum([0, *sizes])


def parse_sample(data, meta_bytes, label_bytes, source: str, layout: str = "video"
                 ) -> RawSample:
    """A sample from the reader's three components. `data` may be a view of the reader's
    buffer: it is copied here, except for "frames" samples, whose drawn frames
    `keep_drawn_frames` copies once their indices are known."""
    try:
        meta = json.loads(bytes(meta_bytes).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError(f"sample {source}: its .json is unreadable ({error})") from None
    try:
        label = int(bytes(label_bytes).decode().strip())
    except ValueError:
        label = int(meta.get("label", -1))
    for key in ("width", "height"):
        if key not in meta:
            raise BadSampleError(f"sample {source}: its .json lacks '{key}'")
        # the boxes are drawn for this size, and stage B checks it against the frames
        if type(meta[key]) is not int or meta[key] < 1:
            raise BadSampleError(f"sample {source}: its .json '{key}' is {meta[key]!r}, not "
                                 "a positive integer")
    data = np.asarray(data) if layout == "frames" else np.array(data)
    offsets = frame_offsets(meta, data.size, source) if layout == "frames" else None
    return RawSample(data=data, meta=meta, label=label, source=source, frame_offsets=offsets)


def keep_drawn_frames(sample: RawSample, frames: np.ndarray) -> None:
    """A "frames" sample cut down to the JPEGs of its drawn frames (copied): of T frames
    stage B decodes at most three, and the rest would only be copied, queued and (from a
    producer process) pickled. Offsets stay indexed by frame, the dropped frames empty, so
    `views.frame_feeds` slices the same bytes out of the smaller buffer."""
    bounds = sample.frame_offsets.tolist()
    drawn = sorted(set(frames.tolist()))
    sample.data = np.concatenate([sample.data[bounds[f]:bounds[f + 1]] for f in drawn])
    sizes = [0] * (len(bounds) - 1)
    for f in drawn:
        sizes[f] = bounds[f + 1] - bounds[f]
    sample.frame_offsets = np.array(list(accumulate(sizes, initial=0)))


def draw_masks(config: PipelineConfig, seed: int, shard_id: int, batch_number: int,
               n_samples: int) -> np.ndarray:
    """The block masks of a batch's 2 x n_samples global crops, from the batch's own seed."""
    grid = config.views.global_size // config.masks.patch_size
    rng = sample_rng(seed, shard_id, batch_number, MASK_STREAM)
    return batch_masks(rng, 2 * n_samples, grid, config.masks)


# --- stage A -------------------------------------------------------------------------------

def holds_passes_in_memory(shard_set: ShardSet, config: PipelineConfig) -> bool:
    """Whether the whole data set fits in the shuffle buffer, which would hold it anyway:
    then `StageA` reads it once and draws each pass as a permutation in memory."""
    return config.shuffle_buffer > 1 and shard_set.total_samples <= config.shuffle_buffer


def writes_run_indices(shard_set: ShardSet, config: PipelineConfig) -> bool:
    """Whether stage A reads passes in runs shorter than a shard, each with an index file
    written for it."""
    return (not holds_passes_in_memory(shard_set, config) and config.pass_chunk > 0
            and any(count > config.pass_chunk for count in shard_set.shard_samples))


def _reader_error(spec: StageASpec, error: Exception) -> BadSampleError:
    return BadSampleError(f"reading shards failed ({', '.join(spec.shard_set.tars)}): "
                          f"{dali_error_reason(str(error))}")


class ReaderPasses:
    """Each pass read by a DALI reader of its own over the shards in that pass's order, in
    reader batches of `reader_batch` from the pass's start: a place in a pass is a reader
    checkpoint plus the samples of the next reader batch already handed out."""

    def __init__(self, spec: StageASpec, pass_index: int, position: int, checkpoint):
        self.spec = spec
        self.pass_index, self.position = pass_index, position
        # Not above a pass: the reader pads its last batch with copies of a sample, and a
        # pass of a few samples would be mostly copies (read, then dropped).
        self.reader_batch = min(spec.batch_size, spec.samples_per_epoch)
        self._own_workdir = None       # when the spec names none: removed with this object
        if spec.workdir is None and writes_run_indices(spec.shard_set, spec.config):
            self._own_workdir = tempfile.TemporaryDirectory(prefix="tcore-pass-")
        self._workdir = spec.workdir or (self._own_workdir and self._own_workdir.name)
        self._open_pass(checkpoint)
        handed_out = position % self.reader_batch
        if handed_out:       # resumed inside a reader batch: read it again, skip what was
            self._run_reader()
            self._next_in_held = handed_out

    def place(self) -> tuple[int, int, object]:
        """(pass, samples of it handed out, the reader checkpoint to resume from)."""
        if self._held is not None and self._next_in_held < len(self._held[0]):
            return self.pass_index, self.position, self._held_from   # a reader batch begun
        return self.pass_index, self.position, self._checkpoint

    def _open_pass(self, checkpoint=None) -> None:
        spec = self.spec
        self.reader = None       # the last pass's reader goes before the next is built
        workdir = None
        if self._workdir:
            workdir = os.path.join(self._workdir, "runs")
            shutil.rmtree(workdir, ignore_errors=True)      # the last pass's run indices
            os.makedirs(workdir)
        self.reader = build_reader(spec.shard_set, spec.config, self.reader_batch, spec.seed,
                                   spec.shard_id, spec.num_shards, self.pass_index,
                                   checkpoint, workdir=workdir)
        self._checkpoint = checkpoint     # the reader's state before its next run
        self._held = None                 # the reader batch in hand (data, meta, label)
        self._held_from = checkpoint      # the reader's state before that batch
        self._next_in_held = 0

    def _run_reader(self) -> None:
        self._held_from = self._checkpoint
        try:
            self._held = self.reader.run()
        except Exception as error:
            raise _reader_error(self.spec, error) from None
        self._checkpoint = self.reader.checkpoint()
        self._next_in_held = 0

    def next_raw(self) -> tuple:
        """The next sample: (data, meta, label) arrays, views of the reader's buffers that
        hold until its next run, and its source."""
        if self.position >= self.spec.samples_per_epoch:
            self.pass_index, self.position = self.pass_index + 1, 0
            self._open_pass()
        if self._held is None or self._next_in_held >= len(self._held[0]):
            self._run_reader()
        i = self._next_in_held
        self._next_in_held += 1
        self.position += 1
        data, meta, label = (tensors[i] for tensors in self._held)
        return (np.asarray(data), np.asarray(meta), np.asarray(label),
                data.source_info() or f"sample {self.position - 1}")


class MemoryPasses:
    """A data set no larger than the shuffle buffer, read once and held (the buffer would
    hold it anyway): each pass is a seeded permutation of every sample, split between the
    ranks, which is what the reference's sampler draws, and no reader is built per pass."""

    def __init__(self, spec: StageASpec, pass_index: int, position: int):
        self.spec = spec
        self.pass_index, self.position = pass_index, position
        self.samples = self._read_all()
        self.order = self._pass_order()

    def place(self) -> tuple[int, int, object]:
        return self.pass_index, self.position, None

    def _read_all(self) -> list[tuple]:
        spec = self.spec
        total = spec.shard_set.total_samples
        reader = build_reader(spec.shard_set, spec.config, total, spec.seed, 0, 1,
                              as_listed=True)
        try:
            data, meta, label = reader.run()
        except Exception as error:
            raise _reader_error(spec, error) from None
        return [(np.array(data[i]), np.array(meta[i]), np.array(label[i]),
                 data[i].source_info() or f"sample {i}") for i in range(total)]

    def _pass_order(self) -> np.ndarray:
        """This rank's part of the pass's permutation (the split of DALI's reader)."""
        total, spec = len(self.samples), self.spec
        permutation = sample_rng(spec.seed, self.pass_index, PASS_STREAM).permutation(total)
        return permutation[total * spec.shard_id // spec.num_shards:
                           total * (spec.shard_id + 1) // spec.num_shards]

    def next_raw(self) -> tuple:
        if self.position >= len(self.order):
            self.pass_index, self.position = self.pass_index + 1, 0
            self.order = self._pass_order()
        self.position += 1
        return self.samples[self.order[self.position - 1]]


class StageA:
    """Reads batches and draws their parameters, from `spec.state` on.

    The stream is pass 0's samples, then pass 1's, ...; one pass (not `infinite`) stops
    after pass 0, its last batch short; a batch that crosses into a new pass takes the end
    of one and the start of the next. A data set that fits in the shuffle buffer is held in
    memory (`MemoryPasses`), any other read pass by pass (`ReaderPasses`)."""

    def __init__(self, spec: StageASpec):
        self.spec = spec
        state = spec.state
        self.samples_seen = state["samples_seen"]
        self.batches_seen = state["batches_seen"]
        if holds_passes_in_memory(spec.shard_set, spec.config):
            self.passes = MemoryPasses(spec, state["pass"], state["pass_position"])
        else:
            self.passes = ReaderPasses(spec, state["pass"], state["pass_position"],
                                        state["reader"])

    def exhausted(self) -> bool:
        """One pass (not `infinite`) and every sample of it handed out."""
        return not self.spec.infinite and self.passes.position >= self.spec.samples_per_epoch

    def state(self) -> dict:
        """The loader state at this point of the stream."""
        spec = self.spec
        pass_index, position, reader = self.passes.place()
        if spec.infinite and position >= spec.samples_per_epoch:
            pass_index, position, reader = pass_index + 1, 0, None
        state = initial_state(spec, reader)
        state.update({"pass": pass_index, "pass_position": position,
                      "samples_seen": self.samples_seen, "batches_seen": self.batches_seen})
        return state

    def next_batch(self) -> HostBatch:
        started = time.perf_counter()
        spec = self.spec
        config = spec.config
        count = spec.batch_size
        if not spec.infinite:
            count = min(count, spec.samples_per_epoch - self.passes.position)
        samples, uniforms, frames, skipped = [], [], [], []
        for _ in range(count):
            data, meta, label, source = self.passes.next_raw()
            try:
                # maybe views of the reader's buffers: parse_sample and keep_drawn_frames
                # copy what is kept before the reader runs again
                sample = parse_sample(data, meta, label, source, spec.shard_set.kind)
            except BadSampleError as error:
                if not config.skip_bad_samples:
                    raise
                skipped.append((source, str(error)))
                continue
            rng = sample_rng(spec.seed, spec.shard_id, self.samples_seen + len(samples))
            uniforms.append(sample_uniforms(rng, config.views.n_local))
            frames.append(drawn_frames(uniforms[-1], sample_frames(sample.meta), config))
            if sample.frame_offsets is not None:
                keep_drawn_frames(sample, frames[-1])
            samples.append(sample)
        # Every sample's parameters at once, from its own uniforms (the same as one by one).
        params = params_from_uniforms(np.array(uniforms), frames,
                                      [s.meta["height"] for s in samples],
                                      [s.meta["width"] for s in samples], config)
        self.samples_seen += count
        self.batches_seen += 1
        masks = draw_masks(config, spec.seed, spec.shard_id, self.batches_seen, len(samples))
        return HostBatch(samples=samples, params=params, masks=masks, state_after=self.state(),
                         batch_number=self.batches_seen, skipped=skipped,
                         seconds=time.perf_counter() - started)
