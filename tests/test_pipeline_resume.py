"""Exact resume: a process is killed mid-run, a new loader restored from the state it saved
yields the very batches an uninterrupted run yields (across an epoch boundary), with stage A
in a thread or in a process of its own (which must then end with its killed parent). Also
the passes of stage A's stream: each epoch every sample once, in an order of its own, and a
resume at any batch, one that straddles two passes included."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.loader import build_loader
from tcore.pipelines.manifest import load_shard_set
from tcore.pipelines.stage_a import StageA, StageASpec, MemoryPasses, initial_state
from tcore.preprocess.shards import build_shards

TOTAL_BATCHES = 9       # 12 samples / batch 2 = 6 per epoch: the run crosses into epoch 2
KILLED_AFTER = 4

CHILD = textwrap.dedent("""
    import hashlib, os, sys, time, torch
    from tcore.pipelines.loader import build_loader
    sys.path.insert(0, os.path.dirname(sys.argv[3]))
    from test_pipeline_resume import digest, small_config
    shards, out, _, producer = sys.argv[1:5]
    loader = build_loader([shards], batch_size=2, config=small_config(producer), seed=11,
                          num_threads=1, prefetch=2)
    for i, batch in enumerate(loader):
        if i == 0 and producer == "process":
            with open(out + "/producer.pid", "w") as handle:
                handle.write(str(loader._producer._process.pid))
        torch.save(loader.state_dict(), out + "/state.tmp")
        os.replace(out + "/state.tmp", out + "/state.pt")
        with open(out + "/digests.txt", "a") as handle:
            handle.write(digest(batch) + "\\n")
        if i + 1 >= %d:
            time.sleep(600)       # wait to be killed (the loader keeps prefetching)
""" % KILLED_AFTER)


def small_config(producer: str = "thread") -> PipelineConfig:
    config = PipelineConfig(shuffle_buffer=8, producer=producer)
    config.views.global_size, config.views.local_size, config.views.n_local = 64, 32, 2
    return config


def digest(batch: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(batch):
        if torch.is_tensor(batch[name]):
            sha.update(name.encode())
            sha.update(batch[name].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _process_ended(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet (the container's init may not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("producer", ["thread", "process"])
def test_killed_and_resumed_run_sees_the_same_batches(synth_shards, tmp_path, producer):
    reference = build_loader([synth_shards], batch_size=2, config=small_config(), seed=11,
                             num_threads=1, prefetch=2)
    expected = [digest(next(reference)) for _ in range(TOTAL_BATCHES)]
    reference.close()
    assert len(set(expected)) == TOTAL_BATCHES

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # The test's directory first, then the caller's path: the child imports the tcore under
    # test (a worktree run with PYTHONPATH), not whichever one is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, str(script), str(synth_shards), str(tmp_path),
                              __file__, producer], env=env, stderr=subprocess.PIPE)
    digests = tmp_path / "digests.txt"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if digests.exists() and len(digests.read_text().split()) >= KILLED_AFTER:
            break
        time.sleep(0.2)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert digests.read_text().split() == expected[:KILLED_AFTER]
    if producer == "process":
        # Orphaned, the stage A process fails its next write into the pipe and exits.
        pid = int((tmp_path / "producer.pid").read_text())
        deadline = time.time() + 30
        while time.time() < deadline and not _process_ended(pid):
            time.sleep(0.2)
        assert _process_ended(pid), f"stage A process {pid} outlived its killed parent"

    resumed = build_loader([synth_shards], batch_size=2, config=small_config(producer),
                           seed=11, num_threads=1, prefetch=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    after = [digest(next(resumed)) for _ in range(TOTAL_BATCHES - KILLED_AFTER)]
    assert after == expected[KILLED_AFTER:]
    # The saved state is the one after the batches returned, not after those prefetched.
    assert resumed.state_dict()["batches_seen"] == TOTAL_BATCHES
    resumed.close()


def test_state_dict_mid_run_in_process(synth_shards):
    config = small_config()
    loader = build_loader([synth_shards], batch_size=3, config=config, seed=2, prefetch=3)
    first = [digest(next(loader)) for _ in range(2)]
    state = loader.state_dict()
    rest = [digest(next(loader)) for _ in range(3)]
    loader.load_state_dict(state)          # rewinds a running loader
    assert [digest(next(loader)) for _ in range(3)] == rest
    loader.close()
    other_seed = build_loader([synth_shards], batch_size=3, config=config, seed=3)
    assert digest(next(other_seed)) != first[0]
    other_seed.close()



def test_a_state_names_its_shards_by_content_not_path(synth_root, synth_shards, tmp_path):
    """The state keeps a hash of what the manifests say: a copy of the shards takes it, other
    shards (the same videos, sharded otherwise) refuse it, and a state saved before the hash
    existed is taken as it is."""
    loader = build_loader([synth_shards], batch_size=2, config=small_config(), seed=2)
    next(loader)
    state = loader.state_dict()
    loader.close()
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    build_loader([copy], batch_size=2, config=small_config(), seed=2).load_state_dict(state)
    other = tmp_path / "other"
    build_shards(synth_root / "train", other, frames=20, short_side=128, codec="vp9",
                 samples_per_shard=4, workers=1, progress=False)
    refusing = build_loader([other], batch_size=2, config=small_config(), seed=2)
    with pytest.raises(ValueError, match="saved over other shards than .*other"):
        refusing.load_state_dict(state)
    refusing.load_state_dict({k: v for k, v in state.items() if k != "data"})


def _stage_a(shards, shard_id: int, num_shards: int, seed: int = 4, batch_size: int = 2,
             buffer: int = 8, chunk: int = 0, state: dict | None = None) -> StageA:
    """Stage A alone (the reader and the host's draws, no decoding), from the start or from
    `state`."""
    shard_set = load_shard_set([shards])
    spec = StageASpec(shard_set=shard_set, batch_size=batch_size,
                      config=PipelineConfig(shuffle_buffer=buffer, pass_chunk=chunk), seed=seed,
                      shard_id=shard_id, num_shards=num_shards, infinite=True,
                      samples_per_epoch=shard_set.samples_in_shard(shard_id, num_shards),
                      state={}, data_id="")
    spec.state = state or initial_state(spec, reader=None)
    return StageA(spec)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """192 small images in 12 shards of 16 (built shuffled), for stage A's passes."""
    root = tmp_path_factory.mktemp("passes")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(48):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / "src" / f"class{c}" / f"image{i:02d}.jpg")
    build_shards(root / "src", root / "shards", kind="image", short_side=16,
                 samples_per_shard=16, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def other_shards(many_shards) -> Path:
    """A second directory: the same images in 8 shards of 24."""
    out = many_shards.parent / "other"
    build_shards(many_shards.parent / "src", out, kind="image", short_side=16,
                 samples_per_shard=24, progress=False)
    return out


def test_two_shard_directories_are_mixed_from_the_first_pass(many_shards, other_shards):
    """Read one after the other, two directories gave batches of one at a time, and with two
    ranks each rank only one of them; the pass's shard order mixes them: 71-79% of the
    batches here hold samples of both, against 12.5% with the shards read as listed."""
    shard_set = load_shard_set([many_shards, other_shards])
    for rank, ranks in ((0, 1), (0, 2), (1, 2)):
        spec = StageASpec(shard_set=shard_set, batch_size=8,
                          config=PipelineConfig(shuffle_buffer=16), seed=4, shard_id=rank,
                          num_shards=ranks, infinite=False,
                          samples_per_epoch=shard_set.samples_in_shard(rank, ranks), state={})
        spec.state = initial_state(spec, reader=None)
        stage, dirs = StageA(spec), []
        while not stage.exhausted():
            dirs.append({Path(s.source.split(":")[0]).parent.name
                         for s in stage.next_batch().samples})
        assert set().union(*dirs) == {"shards", "other"}, (rank, ranks)
        mixed = sum(len(d) == 2 for d in dirs) / len(dirs)
        assert mixed >= 0.5, (rank, ranks, mixed)


def _stream(stage: StageA, batches: int) -> list[list[str]]:
    """The sources ("<tar>:<offset>:<key>") of each of the next `batches` batches."""
    return [[sample.source.rsplit("/", 1)[1] for sample in stage.next_batch().samples]
            for _ in range(batches)]


# read per pass, whole shards or runs of 4 of their 16 samples; held in memory
@pytest.mark.parametrize("buffer, chunk, at_least", [(16, 0, 7.0), (16, 4, 10.0),
                                                     (1024, 64, 10.0)])
def test_each_pass_hands_out_every_sample_once_in_an_order_of_its_own(many_shards, buffer,
                                                                      chunk, at_least):
    """The reference draws a new permutation of the dataset every epoch; DALI's reader reads
    the shards in the order given every time, so a sample's batch-mates would come from the
    same neighbouring shards each epoch. Each pass reads the shards in a permutation of its
    own: over 6 passes a sample's batch-mates here came from 8.7 of the 12
    shards on average, 5.5 with the shards in the same order and only the reader's seed new
    each pass (a buffer of one shard's 16 samples). Cut into runs of 4 permuted together
    (`pass_chunk`), the buffer holds four shards' samples at once: 11.3 (5.5 again with the
    runs in the same order). A data set within the buffer (192 samples, a buffer of 1024)
    is held in memory and each pass is a permutation of it: 11.6. A pass is every sample
    once, on one rank and split over two."""
    passes, batch = 6, 8
    stage = _stage_a(many_shards, 0, 1, batch_size=batch, buffer=buffer, chunk=chunk)
    assert isinstance(stage.passes, MemoryPasses) == (buffer == 1024)
    flat = sum(_stream(stage, passes * 192 // batch), [])
    orders = [flat[k * 192:(k + 1) * 192] for k in range(passes)]
    assert all(sorted(order) == sorted(orders[0]) and len(set(order)) == 192
               for order in orders)
    assert len({tuple(order) for order in orders}) == passes
    mates = defaultdict(set)           # sample -> the shards its batch-mates came from
    for start in range(0, len(flat), batch):
        members = flat[start:start + batch]
        for sample in members:
            mates[sample].update(m.split(":")[0] for m in members if m != sample)
    mean_shards = np.mean([len(shards) for shards in mates.values()])
    assert mean_shards >= at_least, mean_shards
    for_two = [_stage_a(many_shards, rank, 2, batch_size=batch, buffer=buffer, chunk=chunk)
               for rank in (0, 1)]
    streams = [sum(_stream(stage, 3 * 96 // batch), []) for stage in for_two]
    for k in range(3):
        halves = [stream[k * 96:(k + 1) * 96] for stream in streams]
        assert sorted(halves[0] + halves[1]) == sorted(orders[0]), k


@pytest.mark.parametrize("buffer, chunk", [(16, 0), (16, 5), (1024, 64)])
def test_a_resume_at_any_batch_goes_on_as_the_uninterrupted_stream(many_shards, buffer, chunk):
    """Batches of 28 over passes of 192 samples: most passes end inside a batch, which takes
    the end of one pass (its last reader batch) and the start of the next."""
    uninterrupted = _stage_a(many_shards, 0, 1, batch_size=28, buffer=buffer, chunk=chunk)
    states, batches = [], []
    for _ in range(22):                       # 616 samples: into the fourth pass
        host = uninterrupted.next_batch()
        states.append(host.state_after)
        batches.append([(s.source, p.boxes.tobytes()) for s, p in
                        zip(host.samples, host.params)])
    # After 6 batches 168 samples of pass 0 are out; the 7th takes its last 24 and 4 more.
    assert (states[5]["pass"], states[5]["pass_position"]) == (0, 168)
    assert (states[6]["pass"], states[6]["pass_position"]) == (1, 4)
    assert (states[-1]["pass"], states[-1]["pass_position"]) == (3, 40)
    for k in (0, 5, 6, 7, 13, 20):
        resumed = _stage_a(many_shards, 0, 1, batch_size=28, buffer=buffer, chunk=chunk,
                           state=states[k])
        for expected in batches[k + 1:k + 3]:
            host = resumed.next_batch()
            assert [(s.source, p.boxes.tobytes()) for s, p in
                    zip(host.samples, host.params)] == expected, k


def test_each_batch_and_each_rank_draws_its_own_masks_and_params(synth_shards):
    """The seeds are (seed, rank, batch) for masks and (seed, rank, sample counter) for the
    samples: batches do not repeat their masks, and ranks (whose clips here all have the same
    T and size) do not apply the same crops to their n-th sample."""
    rank0, rank1 = _stage_a(synth_shards, 0, 2), _stage_a(synth_shards, 1, 2)
    first, second, other = rank0.next_batch(), rank0.next_batch(), rank1.next_batch()
    assert first.masks.shape == (4, 196) and first.masks.any()
    assert not np.array_equal(first.masks, second.masks)
    assert not np.array_equal(first.masks, other.masks)
    assert {s.source for s in first.samples}.isdisjoint(s.source for s in other.samples)
    for mine, theirs in zip(first.params, other.params):
        assert not np.array_equal(mine.boxes, theirs.boxes)


def _eager_config() -> PipelineConfig:
    config = small_config()
    config.photometric_compile = False      # no compile at the first batch (seconds here)
    return config


def test_load_state_dict_checks_seed_and_batch_size_and_reports_the_state_taken(synth_shards):
    loader = build_loader([synth_shards], batch_size=2, config=_eager_config(), seed=2)
    next(loader)
    state = loader.state_dict()
    loader.close()
    for kwargs, key in ((dict(batch_size=2, seed=3), "seed"), (dict(batch_size=3, seed=2),
                                                              "batch_size")):
        other = build_loader([synth_shards], config=small_config(), **kwargs)
        with pytest.raises(ValueError, match=f"saved with {key}="):
            other.load_state_dict(state)
    other_buffer = small_config()
    other_buffer.shuffle_buffer = 16
    with pytest.raises(ValueError, match="saved with shuffle_buffer=8, this loader has "
                                         "shuffle_buffer=16"):
        build_loader([synth_shards], batch_size=2, config=other_buffer,
                     seed=2).load_state_dict(state)
    # Saved again before a batch (a checkpoint right after resuming): the state it took.
    resumed = build_loader([synth_shards], batch_size=2, config=small_config(), seed=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_a_state_of_an_earlier_tcore_goes_on_from_the_start_of_its_epoch(synth_shards):
    """Version 1 states hold a checkpoint of a reader that read one order every epoch: the
    loader takes them with a warning and goes on from the start of that epoch."""
    loader = build_loader([synth_shards], batch_size=2, config=_eager_config(), seed=2)
    for _ in range(7):                   # 14 samples: 2 into the second epoch of 12
        next(loader)
    state = loader.state_dict()
    loader.close()
    old = {k: v for k, v in state.items() if k not in ("pass", "pass_position")}
    old.update(version=1, reader=b"a checkpoint of the earlier reader")
    resumed = build_loader([synth_shards], batch_size=2, config=_eager_config(), seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(old)
    assert any("earlier tcore" in str(w.message) and "epoch 2" in str(w.message)
               for w in caught)
    next(resumed)
    after = resumed.state_dict()
    assert (after["pass"], after["pass_position"], after["batches_seen"]) == (1, 2, 8)
    resumed.close()


def test_a_finished_one_pass_loader_is_rewound_by_load_state_dict(synth_shards):
    loader = build_loader([synth_shards], batch_size=4, config=_eager_config(), seed=2,
                          infinite=False)
    start = loader.state_dict()
    first = [digest(batch) for batch in loader]
    assert len(first) == 3                         # 12 samples, batches of 4
    loader.load_state_dict(start)
    assert [digest(batch) for batch in loader] == first
