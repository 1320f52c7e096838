"""The training iterator: stage A (read + host draws) -> DALI stage B (views) -> torch.

Stage A (`stage_a.py`: a small checkpointable DALI CPU reader, then every sample's random
parameters and the batch's masks drawn on the host) runs in a producer thread or process
(`producer.py`) and queues its batches. The consumer feeds stage B (`views.py`, pipelined,
`prefetch` batches in flight) and copies its outputs into torch tensors with DALI's PyTorch
plugin. Stage B is a pure function of what it is fed, so checkpointing stage A plus the two
counters is an exact resume; the state kept is the one after the last batch *returned*, not
the last one read, so prefetching does not leak into checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections import deque

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import feed_ndarray
from torch.profiler import record_function

from tcore.pipelines.ahead import AheadThread, Stopped
from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.buffers import HostBufferPool
from tcore.pipelines.colour_graphs import ColourStageGraphs
from tcore.pipelines.arguments import check_dtype, check_seed, torch_device_name
from tcore.pipelines.lanes import ViewLanes
from tcore.pipelines.manifest import (ShardSet, ShardSetError, check_codecs_for_device,
                                      decodes_video_on_gpu, load_shard_set)
from tcore.pipelines.masks import mask_tensors
from tcore.pipelines.producer import start_producer
from tcore.pipelines.sampling import view_slices
from tcore.pipelines.stage_a import (BadSampleError, HostBatch, StageASpec, build_reader,
                                     STATE_VERSION, dali_error_reason, data_identity,
                                     draw_masks, initial_state, sample_frames,
                                     writes_run_indices)
from tcore.pipelines.torch_photometric import apply_photometric, dense_colour_stage, normalize
from tcore.pipelines.views import build_views_pipeline, feed_arrays, frame_feeds, view_rows
from tcore.preprocess.errors import TcoreWarning

_logger = logging.getLogger(__name__)


# --- the iterator ---------------------------------------------------------------------------

class DaliLoader:
    """Iterator over batch dicts (docs/ARCHITECTURE.md batch contract). Build it with
    `build_loader`; `len()` is batches per epoch; `state_dict()` / `load_state_dict()`
    resume exactly; `close()` stops the producer. A bad sample raises BadSampleError, on
    that and every later `next()` (until `load_state_dict`); with `skip_bad_samples` it is
    left out instead (`skipped`, `skipped_count`), and a batch left empty is not handed out."""

    def __init__(self, shard_set: ShardSet, batch_size: int, device: str,
                 config: PipelineConfig, seed: int, shard_id: int, num_shards: int,
                 num_threads: int, prefetch: int, infinite: bool, dtype: torch.dtype,
                 return_params: bool):
        self.shard_set = shard_set
        self.data_id = data_identity(shard_set)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.config = config
        self.seed = seed
        self.shard_id = shard_id
        self.num_shards = num_shards
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads = {num_threads!r}: the loader needs at least one "
                             "thread")
        self.num_threads = num_threads
        self.lanes = self._lane_count(config, num_threads)
        # Batches in flight in stage B: a whole number per lane (see lanes.py).
        self.depth_per_lane = math.ceil(prefetch / self.lanes)
        self.prefetch = self.lanes * self.depth_per_lane
        self.infinite = infinite
        self.dtype = dtype
        self.return_params = return_params
        on_gpu = self.device.type == "cuda"
        self.video_on_gpu = decodes_video_on_gpu(shard_set, on_gpu, config.video_decoder)
        if on_gpu and shard_set.kind == "video":
            # "auto" decides from the codecs; the faster choice depends on the threads given.
            _logger.info("video clips (%s) decoded by %s (video_decoder=%s, %d threads)",
                         ", ".join(sorted(set(shard_set.codecs))),
                         "NVDEC" if self.video_on_gpu else "the CPU threads",
                         config.video_decoder, num_threads)
        # "torch": stage B hands over uint8 views and `_assemble` finishes them.
        self.torch_photometric = config.resolved_photometric() == "torch"
        self.colour_threads = colour_stage_threads(num_threads)
        # The colour stage replayed as CUDA graphs, one per crop shape (`_finish_views`).
        self.colour_graphs = None
        if on_gpu and self.torch_photometric and config.photometric_graphs:
            self.colour_graphs = ColourStageGraphs(functools.partial(
                _colour_stage_normalised, views=config.views, dtype=dtype,
                compile_=config.photometric_compile,
                static_shapes=config.photometric_static_shapes))
        self._buffers = HostBufferPool()
        self.producer_kind = config.resolved_producer(on_gpu)
        # Batches made ahead of next() by a thread of the loader (ahead.py); 0: by next().
        self.ahead = config.assemble_ahead
        _logger.info("loader on %s: stage A in a %s, colour stage in %s, %d batches in flight%s",
                     self.device, self.producer_kind,
                     _colour_stage_words(self.torch_photometric, config.photometric_compile,
                                         self.colour_graphs is not None,
                                         on_gpu and config.photometric_static_shapes),
                     self.prefetch,
                     f", {self.ahead} made ahead in a thread" if self.ahead else "")
        self.samples_per_epoch = shard_set.samples_in_shard(shard_id, num_shards)
        # (source, why) per skipped sample; samples DALI's reader drops for a missing
        # component are one entry ("<shards>", "N samples lack ..."): it does not name them.
        self.skipped: list[tuple[str, str]] = []
        self._unnamed_skipped = 0     # the N of that entry
        self._check_rank_has_samples()
        if config.skip_bad_samples:
            self._count_readable_samples()
            self._check_rank_has_samples()
        self._failure: BadSampleError | None = None
        self._resume: dict | None = None
        self._state: dict | None = None
        # Stage A's own time for the batches returned (bench data reports the mean).
        self.stage_a_seconds, self.stage_a_batches = 0.0, 0
        self.phase_seconds: dict[str, float] = {}   # host time per part of next() (`_phase`)
        self._streams: dict = {}    # GPU only: the loader's own CUDA streams (`_stream`)
        self._started = False
        self._exhausted = False
        self._workdir: str | None = None     # stage A's run index files (StageASpec.workdir)
        self._ahead_thread: AheadThread | None = None
        # Polled while waiting for stage A by a thread making batches ahead (asked to stop?);
        # None: next() waits for stage A itself.
        self._stopping = None
        # Whether the colour stage may capture a CUDA graph for a new shape now. A capture is
        # invalidated by a synchronising CUDA call from another thread on the same GPU (thread-
        # local capture mode or not), and a training thread may make one (a window's sync, a
        # logged loss) while a thread of ours makes batches ahead: that thread captures only
        # for its first batch, which the training thread waits for; a shape first met later
        # (a batch left smaller by skipped samples) runs as launched.
        self._may_capture = True

    # -- public API
    def __len__(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self):
        return self

    @property
    def skipped_count(self) -> int:
        """Samples skipped so far (skip_bad_samples), each counted once."""
        return len(self.skipped) - (self._unnamed_skipped > 0) + self._unnamed_skipped

    def __next__(self) -> dict:
        # A bad sample ends the loader as it ends stage A: the same error on every later
        # call, rather than going on past the batch that held it (and its good samples).
        if self._failure is not None:
            raise self._failure
        try:
            if self.ahead:
                batch, ready = self._next_made_ahead()
            else:
                batch, ready = self._next_batch(self._account)
        except BadSampleError as error:
            self._failure = error
            self.close()
            raise
        return self._hand_over(batch, ready)

    def _account(self, host: HostBatch) -> None:
        """What handing out (or skipping) `host`'s batch changes: the state a checkpoint
        keeps is the one after the last batch *returned*, so this runs in the caller's
        thread, when the batch is returned."""
        self.skipped.extend(host.skipped)
        self._state = host.state_after       # past an empty batch too: exact resume
        self.stage_a_seconds += host.seconds
        self.stage_a_batches += 1

    def _next_batch(self, account) -> tuple[dict, object]:
        """The next batch and its readiness (`_assemble`); `account(host)` for each host
        batch used up, the batch's own and any left empty by skipped samples before it."""
        skipped_here = 0    # samples skipped since this call began, to stop at a whole epoch
        while True:
            if self._exhausted:
                raise StopIteration
            if not self._started:
                self._start()
            if not self._pending:
                self._exhausted = True
                self._close_stages()
                raise StopIteration
            host = self._pending.popleft()
            with self._phase("stage_b_wait"):
                outputs = self._stage_b_outputs(host)
            made = None
            if host.samples:     # else every sample of it was skipped: go on to the next
                with self._phase("assemble"):
                    made = self._assemble(host, outputs)
            with self._phase("feed_next"):
                self._drain_fillers(host)
                self._top_up()
            account(host)
            if made is not None:
                return made
            skipped_here += len(host.skipped)
            if skipped_here >= self.samples_per_epoch:
                source, message = host.skipped[-1]
                raise BadSampleError(f"skipped {skipped_here} samples in a row, an epoch's "
                                     f"worth, without one to hand out; the last: sample "
                                     f"{source}: {message}")

    # -- batches made ahead in a thread (assemble_ahead)
    def _next_made_ahead(self) -> tuple[dict, object]:
        """The next batch from the thread making them, which starts from the state after the
        last batch returned; once it has ended (end of a one-pass epoch, an error) a later
        call starts a new one, as `_next_batch` would start stage A afresh."""
        if self._ahead_thread is None:
            if self._exhausted:
                raise StopIteration
            # The thread holds the loader weakly, so a loader dropped without close() is
            # still finalised (and closed) instead of kept alive by its own thread.
            self._ahead_thread = AheadThread(functools.partial(_make_ahead, weakref.ref(self)),
                                             self.ahead, name="tcore-loader-ahead",
                                             device=_with_index(self.device))
        while True:
            with self._phase("ahead_wait"):
                try:
                    hosts, made = self._ahead_thread.get()
                except BaseException:
                    self._stop_ahead()     # it has ended: what it raised is raised here
                    raise
            for host in hosts:
                self._account(host)
            if made is not None:
                return made

    def _stop_ahead(self) -> None:
        if self._ahead_thread is not None:
            self._ahead_thread.close()
            self._ahead_thread = None
        self._stopping = None
        self._may_capture = True

    def _hand_over(self, batch: dict, ready) -> dict:
        """On a GPU the caller's stream waits for the batch on the device (its colour stage
        may still run on the loader's work stream), and the batch's memory is not reused
        before that stream is done with it. In the caller's thread: with `assemble_ahead`
        the batch was made by another, whose current stream is not the training one."""
        if ready is None:
            return batch
        training = torch.cuda.current_stream(self.device)
        training.wait_event(ready)
        for tensor in batch.values():
            if torch.is_tensor(tensor):
                tensor.record_stream(training)
        return batch

    @contextlib.contextmanager
    def _phase(self, name: str):
        """A named part of next(): a profiler range (`tcore bench train --profile`) and its
        host wall time summed in `phase_seconds` (`tcore bench data` reports it per batch),
        so a run shows whether next() waits for stage B or spends its own time."""
        began = time.perf_counter()
        with record_function(f"tcore.loader.{name}"):
            yield
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - began

    def state_dict(self) -> dict:
        """The state after the last batch returned (before the first one: the start)."""
        if self._state is not None:
            return dict(self._state)
        if self._resume is not None:
            return dict(self._resume)
        return initial_state(self, reader=None)

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") == 1:
            state = self._state_of_an_earlier_tcore(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not "
                             f"{STATE_VERSION}")
        for key in ("seed", "shard_id", "num_shards", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this "
                                 f"loader has {key}={getattr(self, key)}")
        # The reader's checkpoint is of a buffer of that size (states of version 1 lack it).
        saved_buffer = state.get("shuffle_buffer", self.config.shuffle_buffer)
        if saved_buffer != self.config.shuffle_buffer:
            raise ValueError(f"loader state was saved with shuffle_buffer={saved_buffer}, this "
                             f"loader has shuffle_buffer={self.config.shuffle_buffer}")
        # States saved before the identity was kept have none: those are taken as they are.
        if state.get("data", self.data_id) != self.data_id:
            dirs = ", ".join(m["_dir"] for m in self.shard_set.manifests)
            raise ValueError(f"loader state was saved over other shards than {dirs} (data "
                             f"{state['data']}, these are {self.data_id}): resume with the "
                             "run's own data")
        if self._ahead_thread is not None or self._started:
            self.close()
        self._resume = dict(state)
        self._state = None
        self._exhausted = False
        self._failure = None

    def _state_of_an_earlier_tcore(self, state: dict) -> dict:
        """A version 1 state: its reader read one order every epoch, and its checkpoint is
        of that reader. Go on from the start of the epoch it was in, with this tcore's order
        for it, and say that the batches are not the ones that run would have seen."""
        state = dict(state)
        position = state["batches_seen"] * state["batch_size"]
        pass_index = position // self.samples_per_epoch if self.infinite else 0
        state.update(version=STATE_VERSION, reader=None, pass_position=0)
        state["pass"] = pass_index
        warnings.warn(f"loader state saved by an earlier tcore, whose reader read the shards "
                      f"in one order every epoch: going on from the start of epoch "
                      f"{pass_index + 1} in this tcore's order, so the batches from here on "
                      f"are not the ones that run would have seen", TcoreWarning)
        return state

    def close(self) -> None:
        self._stop_ahead()     # first: the thread making batches ahead uses the stages
        self._close_stages()

    def _close_stages(self) -> None:
        """Stop stage A and drop stage B (from the thread that makes batches)."""
        if self._started:
            self._producer.close()
            self._pipe_b = None
            self._buffers.clear()       # batches still held by the caller keep their memory
            self._probe = None
            self._started = False
        if self._workdir is not None:       # after the producer: nothing writes there now
            self._remove_workdir()
            self._workdir = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- start-up
    def _start(self) -> None:
        # After a close() (or an error), from the last batch returned, so none is lost.
        state = self._state or self._resume or initial_state(self, reader=None)
        if not self.infinite and state["batches_seen"] >= len(self):
            self._exhausted = True
            raise StopIteration
        self._producer = start_producer(self.producer_kind, self.stage_a_spec(state),
                                        depth=self.prefetch + 1)
        self._probe = None
        self._pending: deque[HostBatch] = deque()
        self._started = True
        hosts = [self._take() for _ in range(self.prefetch)]
        self._start_views([h for h in hosts if h is not None])

    def stage_a_spec(self, state: dict | None = None) -> StageASpec:
        """What stage A starts from: `state` (default: the start). Creates the directory of
        the runs' index files where stage A writes them; `close()` removes it."""
        if self._workdir is None and writes_run_indices(self.shard_set, self.config):
            self._workdir = tempfile.mkdtemp(prefix="tcore-pass-")
            # removed by close(), or at exit where the loader was never closed
            self._remove_workdir = weakref.finalize(self, shutil.rmtree, self._workdir, True)
        return StageASpec(shard_set=self.shard_set, batch_size=self.batch_size,
                          config=self.config, seed=self.seed, shard_id=self.shard_id,
                          num_shards=self.num_shards, infinite=self.infinite,
                          samples_per_epoch=self.samples_per_epoch,
                          state=state or initial_state(self, reader=None),
                          data_id=self.data_id, workdir=self._workdir)

    def _count_readable_samples(self) -> None:
        """In skip mode DALI drops samples with a missing component: count from the reader
        what is really there (len() and one-pass epochs), and record the difference."""
        reader = build_reader(self.shard_set, self.config, self.batch_size, self.seed,
                              self.shard_id, self.num_shards, as_listed=True)
        readable = reader.epoch_size("Reader")
        del reader
        missing = self.shard_set.total_samples - readable
        if missing > 0:
            self.skipped.append(("<shards>", f"{missing} samples lack a component"))
            self._unnamed_skipped = missing
            self.shard_set.total_samples = readable
            self.samples_per_epoch = self.shard_set.samples_in_shard(self.shard_id,
                                                                     self.num_shards)

    def _check_rank_has_samples(self) -> None:
        """DALI's reader needs a sample per shard (rank): say so at start-up, instead of its
        error on the first batch (or an empty one-pass epoch)."""
        total = self.shard_set.total_samples
        if self.samples_per_epoch == 0 or total < self.num_shards:
            dirs = ", ".join(m["_dir"] for m in self.shard_set.manifests)
            raise ShardSetError(f"rank {self.shard_id} of world size {self.num_shards}: the "
                             f"shards ({dirs}) hold {total} readable samples, fewer than the "
                             f"{self.num_shards} ranks, and each rank needs at least one "
                             f"(this one gets {self.samples_per_epoch})")

    def _lane_count(self, config: PipelineConfig, num_threads: int) -> int:
        """One stage B pipeline on a GPU; on the CPU `cpu_lanes` (0: one per thread)."""
        if self.device.type == "cuda":
            return 1
        return min(num_threads, config.cpu_lanes or num_threads)

    def _build_views(self, batch_size: int, lanes: int, depth_per_lane: int):
        """Stage B: one DALI pipeline, or `lanes` of them behind a ViewLanes."""
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None \
                else torch.cuda.current_device()
        out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        threads = max(1, self.num_threads // lanes)
        pipes = [build_views_pipeline(self.shard_set.kind, self.config.views, batch_size,
                                      device_id, threads, depth_per_lane, out_dtype,
                                      seed=self.seed, decode_video_on_gpu=self.video_on_gpu,
                                      photometric_in_graph=not self.torch_photometric,
                                      frame_sizes=True)
                 for _ in range(lanes)]
        return pipes[0] if lanes == 1 else ViewLanes(pipes)

    # -- stage B (consumer thread)
    def _take(self) -> HostBatch | None:
        """The next host batch from the producer; None once the pass is over."""
        try:
            return self._producer.get(self._stopping)
        except Stopped:
            raise     # the caller's close() stops the stages once this thread has ended
        except BaseException:
            self._close_stages()   # a later next() starts afresh after the last batch returned
            raise

    def _start_views(self, hosts: list[HostBatch]) -> None:
        """A fresh stage B with `hosts` in flight. Its first schedule_run runs `prefetch`
        iterations at once, so that many batches must be fed first (padded with repeats of
        the last one at the very end of a pass; their outputs are never read)."""
        self._pipe_b = self._build_views(self.batch_size, self.lanes, self.depth_per_lane)
        self._fillers = (None, 0)     # those of a pipeline before this one are gone with it
        self._pending.extendleft(reversed(hosts))
        feedable = [h for h in hosts if h.samples]
        if not feedable:
            self._pipe_b_fresh = True
            return
        for host in feedable:
            self._feed(self._pipe_b, host)
        self._fillers = (feedable[-1], max(0, self.prefetch - len(feedable)))
        for _ in range(self._fillers[1]):
            self._feed(self._pipe_b, feedable[-1])
        self._pipe_b.schedule_run()
        for _ in range(len(feedable) - self.prefetch):
            self._pipe_b.schedule_run()
        self._pipe_b_fresh = False

    def _drain_fillers(self, host: HostBatch) -> None:
        """Read past the padding iterations that follow `host` (see _start_views)."""
        anchor, count = getattr(self, "_fillers", (None, 0))
        if anchor is host and count:
            self._fillers = (None, 0)
            for _ in range(count):
                self._pipe_b.outputs()

    def _top_up(self) -> None:
        """Take the next host batch (if any) and put it in flight in stage B."""
        host = self._take()
        if host is None:
            return
        if self._pipe_b_fresh:
            self._pending_clear_and_restart(host)
            return
        self._pending.append(host)
        if host.samples:
            self._feed(self._pipe_b, host)
            self._pipe_b.schedule_run()

    def _pending_clear_and_restart(self, host: HostBatch) -> None:
        hosts = list(self._pending) + [host]
        self._pending.clear()
        self._start_views(hosts)

    def _feed(self, pipe, host: HostBatch) -> None:
        arrays = feed_arrays([s.data for s in host.samples], host.params,
                             self.config.views.blur_kernel,
                             photometric=not self.torch_photometric)
        if self.shard_set.kind == "frames":
            arrays.update(frame_feeds([s.data for s in host.samples],
                                      [s.frame_offsets for s in host.samples], host.params))
        for name in pipe.feed_names:
            pipe.feed_input(name, arrays[name])

    def _stage_b_outputs(self, host: HostBatch):
        if not host.samples:
            return None
        try:
            outputs = self._pipe_b.outputs()
        except Exception as error:  # a sample failed to decode or augment
            return self._recover(host, error)
        bad = _size_mismatches(host.samples, outputs[-1])
        if not bad:
            return outputs
        del outputs     # the old pipeline's buffers, before _drop_samples rebuilds stage B
        return self._drop_samples(host, bad)

    def _recover(self, host: HostBatch, error: Exception):
        """Find the failing samples one by one, then `_drop_samples` them."""
        bad = self._probe_samples(host)
        if not bad:
            raise BadSampleError(f"stage B failed on a batch of {len(host.samples)} samples "
                                 f"({host.samples[0].source} ...): "
                                 f"{dali_error_reason(str(error))}") from None
        return self._drop_samples(host, bad)

    def _drop_samples(self, host: HostBatch, bad: list[tuple[str, str]]):
        """Raise naming the first bad sample or (skip mode) drop them all, rebuild stage B,
        re-feed everything in flight and return this batch's outputs (None: none left)."""
        if not self.config.skip_bad_samples:
            source, message = bad[0]
            raise BadSampleError(f"sample {source} {message}") from None
        bad_sources = {source for source, _ in bad}
        keep = [i for i, s in enumerate(host.samples) if s.source not in bad_sources]
        host.samples = [host.samples[i] for i in keep]
        host.params = [host.params[i] for i in keep]
        host.masks = draw_masks(self.config, self.seed, self.shard_id, host.batch_number,
                                len(keep))
        host.skipped.extend(bad)
        later = list(self._pending)
        self._pending.clear()
        self._start_views([host] + later)
        self._pending.popleft()
        return self._pipe_b.outputs() if host.samples else None

    def _probe_samples(self, host: HostBatch) -> list[tuple[str, str]]:
        bad = []
        for sample, params in zip(host.samples, host.params):
            if self._probe is None:
                self._probe = self._build_views(1, 1, 1)
            probe = HostBatch(samples=[sample], params=[params], masks=host.masks,
                              state_after={}, batch_number=0)
            try:
                self._feed(self._probe, probe)
                self._probe.schedule_run()
                outputs = self._probe.outputs()
            except Exception as error:
                bad.append((sample.source,
                            f"cannot be decoded: {dali_error_reason(str(error))}"))
                self._probe = None   # a pipeline that raised is not reused
                continue
            bad += _size_mismatches([sample], outputs[-1])
        return bad

    def _finish_views(self, batch: dict, host: HostBatch) -> None:
        """The colour stage in torch on the uint8 views (crop-major, like the batch), from the
        same per-view rows, switches and blur windows the DALI graph would be fed."""
        views = self.config.views
        # [n, V, ...] for the batch at once
        inputs = view_rows(np.stack([p.photometric for p in host.params]),
                           np.stack([p.jitter_order for p in host.params]), views.blur_kernel)
        on_gpu = self.device.type == "cuda"
        compile_ = self.config.photometric_compile
        static_shapes = on_gpu and self.config.photometric_static_shapes
        # On the CPU only the cores stage B's threads leave free (`colour_stage_threads`).
        with contextlib.nullcontext() if on_gpu else torch_threads(self.colour_threads):
            for name, where in view_slices(views.n_local).items():
                if where.stop == where.start:
                    continue
                # the group's views, crop-major like the batch: view k of sample i at k * n + i
                rows, switches, windows = (np.swapaxes(part[:, where], 0, 1).reshape(
                    -1, *part.shape[2:]) for part in inputs)
                if self.colour_graphs is not None:
                    batch[name] = self.colour_graphs(batch[name], rows, switches, windows,
                                                     may_capture=self._may_capture)
                    continue
                # On a GPU the whole stage as one call over every crop: its Python and
                # launches are the cost there, not arithmetic; on the CPU each step on its
                # crops only.
                crops = apply_photometric(batch[name], rows, switches, windows, views,
                                          compile_, dense=on_gpu, static_shapes=static_shapes)
                batch[name] = normalize(crops, views, self.dtype, compile_, static_shapes)

    # -- batch dict
    @contextlib.contextmanager
    def _stream(self, role: str):
        """On a GPU, run the block on one of the loader's own CUDA streams: "copy" for the
        copies out of stage B's buffers, which the host then waits for (DALI reuses its
        buffers once they are done; only copies are on that stream, so the wait is short),
        "work" for the rest of the batch (colour stage, dtype, small uploads), which the host
        does not wait for: the training stream waits for it on the device, so it can run
        beside the previous step instead of ahead of the next. On the CPU: nothing."""
        if self.device.type != "cuda":
            yield None
            return
        if role not in self._streams:
            self._streams[role] = torch.cuda.Stream(self.device)
        stream = self._streams[role]
        with torch.cuda.stream(stream):
            yield stream
        if role == "copy":
            stream.synchronize()

    def _assemble(self, host: HostBatch, outputs) -> tuple[dict, object]:
        """The batch dict and, on a GPU, the event its work stream records once the batch
        is made (`_hand_over` waits for it); on the CPU None."""
        n = len(host.samples)
        copied = self._copy_views(outputs, n)
        ready = None
        with self._stream("work") as work:
            if work is not None:
                work.wait_stream(self._streams["copy"])
                for tensor in copied.values():   # read on the work stream, made on the copy one
                    tensor.record_stream(work)
            batch = self._finish_batch(copied, host)
            if work is not None:
                ready = work.record_event()
        if self.return_params:
            batch["params"] = host.params
            batch["sources"] = [s.source for s in host.samples]
            batch["frame_counts"] = [sample_frames(s.meta) for s in host.samples]
            batch["frame_sizes"] = [(int(s.meta["height"]), int(s.meta["width"]))
                                    for s in host.samples]
        return batch, ready

    def _copy_views(self, outputs, n: int) -> dict:
        """Stage B's views copied out of its buffers into tensors of ours, crop-major: uint8
        for the torch colour stage, else float32 / float16 as the graph made them."""
        views = self.config.views
        on_gpu = self.device.type == "cuda"
        copy_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        if self.torch_photometric:
            copy_dtype = torch.uint8
        sizes = {"global_crops": views.global_size, "local_crops": views.local_size,
                 "past_crops": views.global_size, "future_crops": views.global_size}
        copied = {}
        with self._stream("copy") as stream:
            for name, where in view_slices(views.n_local).items():
                n_views = where.stop - where.start
                size = sizes[name]
                shape = (n_views * n, 3, size, size)
                tensor = (torch.empty(shape, dtype=copy_dtype, device=self.device) if on_gpu
                          else self._buffers.empty(shape, copy_dtype))
                for k in range(n_views if n else 0):
                    feed_ndarray(outputs[where.start + k].as_tensor(),
                                 tensor[k * n:(k + 1) * n], cuda_stream=stream)
                copied[name] = tensor
        return copied

    def _finish_batch(self, copied: dict, host: HostBatch) -> dict:
        """The batch dict from the copied views: colour stage or dtype, masks, indices."""
        n = len(host.samples)
        batch = dict(copied)
        for name, tensor in copied.items():
            if tensor.dtype not in (self.dtype, torch.uint8):   # uint8: _finish_views converts
                batch[name] = tensor.to(self.dtype)
        if self.torch_photometric and n:
            with record_function("tcore.loader.torch_photometric"):
                self._finish_views(batch, host)
        cpu = mask_tensors(host.masks)
        cpu["frame_indices"] = torch.from_numpy(
            np.stack([p.frames for p in host.params]) if n else np.zeros((0, 3), np.int64))
        cpu["labels"] = torch.tensor([s.label for s in host.samples], dtype=torch.int64)
        for name, tensor in cpu.items():
            if self.device.type == "cuda":   # pinned, so the upload does not hold the host
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            batch[name] = tensor
        return batch


def _make_ahead(loader_ref, put, stopping) -> None:
    """The loop of a loader's thread (assemble_ahead): (hosts used up, (batch, ready)) for
    each batch, and before an error or the end, the hosts used up on the way there (skipped
    samples). It holds the loader only while making a batch, not while waiting to put it."""
    while True:
        loader = loader_ref()
        if loader is None:
            return
        loader._stopping = stopping
        hosts: list[HostBatch] = []
        try:
            made = loader._next_batch(hosts.append)
            loader._may_capture = False
        except Stopped:
            raise
        except BaseException:
            if hosts:
                put((hosts, None))
            raise
        finally:
            del loader
        put((hosts, made))


def _with_index(device: torch.device) -> torch.device:
    """A CUDA device with its index: "cuda" is the caller's current device, and another
    thread's current device is its own (device 0 until set)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _colour_stage_normalised(crops: torch.Tensor, rows: torch.Tensor, switches: torch.Tensor,
                             windows: torch.Tensor, *, views, dtype: torch.dtype,
                             compile_: bool, static_shapes: bool) -> torch.Tensor:
    """The GPU colour stage of one view group from device tensors: what a graph captures."""
    finished = dense_colour_stage(crops, rows, switches, windows, views, compile_,
                                  static_shapes)
    return normalize(finished, views, dtype, compile_, static_shapes)


def _colour_stage_words(in_torch: bool, compiled: bool, graphed: bool,
                        static_shapes: bool = False) -> str:
    if not in_torch:
        return "the DALI graph"
    # Said up front: the first batch then waits for the compiler (26 s on 2 CPU cores with
    # an empty Inductor cache, 7.5 s from it; docs/PERFORMANCE.md, eighth session).
    words = "torch (eager)"
    if compiled:
        words = ("torch (compiled at the first batch of each crop shape)" if static_shapes
                 else "torch (compiled at the first batch)")
    return words + (", replayed as CUDA graphs" if graphed else "")


def colour_stage_threads(loader_threads: int) -> int:
    """torch threads for the CPU colour stage: the cores the loader's own threads leave free,
    at least one, at most torch's setting. Why not torch's default (all cores): stage B's
    threads are busy beside it, and a parallel kernel on oversubscribed cores waits at every
    barrier for a worker that is not running (docs/PERFORMANCE.md, eighth session: the
    exact-jitter loader ~25% faster on 2 cores with one thread here)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:             # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - loader_threads))


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` for the block, then restored (the
    caller's, e.g. a CPU training step's, is left as it was)."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _size_mismatches(samples, sizes) -> list[tuple[str, str]]:
    """(source, why) of the samples whose decoded frames are not the size in their .json,
    which their boxes were drawn for; `sizes`: stage B's `frame_sizes` output."""
    decoded = np.asarray(sizes.as_array()).reshape(len(samples), -1, 2).astype(np.int64)
    bad = []
    for sample, frames in zip(samples, decoded):
        expected = (int(sample.meta["height"]), int(sample.meta["width"]))
        found = next((tuple(int(v) for v in hw) for hw in frames if tuple(hw) != expected),
                     None)
        if found is not None:
            bad.append((sample.source, f"has {found[0]}x{found[1]} frames but its .json says "
                                       f"{expected[0]}x{expected[1]} (height x width)"))
    return bad


def distributed_shard(shard_id, num_shards) -> tuple[int, int]:
    """(shard_id, num_shards), defaulting to torch.distributed's rank and world size."""
    if shard_id is None or num_shards is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shard_id = torch.distributed.get_rank() if shard_id is None else shard_id
            num_shards = torch.distributed.get_world_size() if num_shards is None \
                else num_shards
        else:
            shard_id, num_shards = shard_id or 0, num_shards or 1
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is outside 0..{num_shards - 1}")
    return shard_id, num_shards


def build_loader(manifests, batch_size: int, device: str = "cpu",
                 config: PipelineConfig | None = None, seed: int = 0, shard_id=None,
                 num_shards=None, num_threads: int = 2, prefetch: int | None = None,
                 infinite: bool = True, dtype: torch.dtype = torch.float32,
                 return_params: bool = False) -> DaliLoader:
    """The DALI loader over one or several shard directories (or manifest.json paths, or a
    ShardSet from `load_shard_set`).

    device: "cpu" (DALI CPU backend) or "cuda[:i]" (mixed decoders, GPU augmentations;
    "gpu" is "cuda"). seed: 0 to 2**31 - 1. dtype: float32, float16 or bfloat16.
    infinite=True streams forever (training); False gives one pass of `len()` batches, the
    last one possibly smaller. return_params adds the drawn SampleParams, sample sources,
    T and frame sizes to each batch (for previews, statistics and comparisons). prefetch:
    batches in flight in stage B (None: `config.prefetch`).
    """
    config = config or PipelineConfig()
    if prefetch is not None:   # the argument overrides the config, under the config's check
        config = dataclasses.replace(config, prefetch=prefetch)
    config = config.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    check_seed(seed)
    check_dtype(dtype)
    shard_set = load_shard_set(manifests)
    torch_device = torch_device_name(device)
    on_gpu = torch.device(torch_device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} asked for, but torch sees no GPU")
    check_codecs_for_device(shard_set, decodes_video_on_gpu(shard_set, on_gpu,
                                                            config.video_decoder))
    shard_id, num_shards = distributed_shard(shard_id, num_shards)
    return DaliLoader(shard_set, batch_size, torch_device, config, seed, shard_id, num_shards,
                      num_threads, config.prefetch, infinite, dtype, return_params)
