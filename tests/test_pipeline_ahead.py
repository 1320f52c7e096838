"""Batches made ahead of next() by a thread of the loader (`assemble_ahead`): the same batches
in the same order as next() makes them itself, a state after the last batch *returned* (so a
resume goes on exactly, whatever the thread has made beyond it), a bad sample raised at its
batch, and a close() that stops the thread wherever it waits. The thread itself
(`AheadThread`): items in order, then what ended it, and a stop that reaches it."""
import threading
import time

import pytest

from tcore.pipelines.ahead import AheadThread, Stopped
from tcore.pipelines.config import PipelineConfig, PipelineConfigError
from tcore.pipelines.loader import build_loader
from tcore.pipelines.stage_a import BadSampleError

from test_pipeline_loader import _copy, _corrupt_one_clip
from test_pipeline_resume import digest

THREAD_NAME = "tcore-loader-ahead"


def config(ahead: int, **options) -> PipelineConfig:
    made = PipelineConfig(shuffle_buffer=8, photometric_compile=False, assemble_ahead=ahead,
                          **options)
    made.views.global_size, made.views.local_size, made.views.n_local = 64, 32, 2
    return made


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def made_by(loader, count: int) -> list[str]:
    return [digest(next(loader)) for _ in range(count)]


def wait_until(reached, seconds: float = 60.0) -> None:
    """Poll for a state the thread gets to in its own time (a sleep may be too short on a
    busy machine, and then the test would not test what it says)."""
    deadline = time.monotonic() + seconds
    while not reached():
        assert time.monotonic() < deadline, "the thread did not get there"
        time.sleep(0.01)


def batches_made_ahead(loader) -> int:
    return loader._ahead_thread._queue.qsize()


def test_a_one_pass_epoch_made_ahead_is_the_one_next_makes(synth_shards):
    """12 samples in batches of 5: 5, 5 and 2, then the end, on every later call too."""
    epochs = {}
    for ahead in (0, 2):
        loader = build_loader([synth_shards], batch_size=5, config=config(ahead), seed=3,
                              num_threads=1, infinite=False, return_params=True)
        batches = list(loader)
        epochs[ahead] = [(digest(b), b["sources"]) for b in batches]
        assert [len(b["sources"]) for b in batches] == [5, 5, 2]
        with pytest.raises(StopIteration):
            next(loader)
        assert loader.state_dict()["batches_seen"] == 3
        loader.close()
    assert epochs[2] == epochs[0]
    assert not ahead_threads()


def test_the_state_is_the_one_after_the_batch_returned_and_a_resume_is_exact(synth_shards):
    """With two batches ahead the thread has made batches 5 and 6 when the caller has had 4;
    the state says 4, and a loader restored from it (made ahead or not), like the running
    one rewound to it, goes on with batch 5, across the end of the 6-batch epoch."""
    def loader_with(ahead):
        return build_loader([synth_shards], batch_size=2, config=config(ahead), seed=11,
                            num_threads=1, prefetch=2)

    plain = loader_with(0)
    first = made_by(plain, 4)
    expected = made_by(plain, 5)
    plain.close()

    running = loader_with(2)
    assert made_by(running, 4) == first
    wait_until(lambda: batches_made_ahead(running) == 2)   # the thread fills its two places
    state = running.state_dict()
    assert state["batches_seen"] == 4
    assert made_by(running, 5) == expected
    for ahead in (0, 2):
        restored = loader_with(ahead)
        restored.load_state_dict(state)
        assert made_by(restored, 5) == expected, ahead
        restored.close()
    running.load_state_dict(state)        # rewound while its thread is ahead of it
    assert made_by(running, 5) == expected
    running.close()
    assert not ahead_threads()


def test_closing_stops_the_thread_while_it_waits_for_room(synth_shards):
    loader = build_loader([synth_shards], batch_size=2, config=config(1), num_threads=1)
    next(loader)
    wait_until(lambda: batches_made_ahead(loader) == 1)   # made, the thread waits for room
    assert len(ahead_threads()) == 1
    began = time.monotonic()
    loader.close()
    assert time.monotonic() - began < 5
    assert not ahead_threads() and not loader._started
    next(loader)                          # and a later next() starts it again
    assert len(ahead_threads()) == 1
    loader.close()


def test_a_loader_dropped_without_close_is_finalised_and_its_thread_ends(synth_shards):
    """The thread holds its loader only while making a batch: one dropped by its caller is
    finalised (closed) rather than kept alive, with its stages, by its own thread."""
    import gc
    import weakref

    loader = build_loader([synth_shards], batch_size=2, config=config(1), num_threads=1)
    next(loader)
    time.sleep(0.5)
    dropped = weakref.ref(loader)
    del loader
    deadline = time.monotonic() + 10
    while (dropped() is not None or ahead_threads()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert dropped() is None and not ahead_threads()


def test_a_bad_sample_is_raised_at_its_batch_and_skipped_when_asked(synth_shards, tmp_path):
    shards = _copy(synth_shards, tmp_path)
    key = _corrupt_one_clip(shards)
    reference = build_loader([shards], batch_size=2, config=config(0, skip_bad_samples=True),
                             infinite=False, return_params=True)
    expected = [b["sources"] for b in reference]
    # the batches handed out before the error: those before the bad sample's batch
    before = next(i for i, sources in enumerate(expected) if len(sources) < 2)
    for ahead in (0, 2):
        loader = build_loader([shards], batch_size=2, config=config(ahead), infinite=False)
        good = 0
        with pytest.raises(BadSampleError, match=f"shard-000000.tar.*{key}"):
            for _ in loader:
                good += 1
        assert good == before, ahead
        with pytest.raises(BadSampleError):   # on every later call
            next(loader)
        assert not ahead_threads()
        skipping = build_loader([shards], batch_size=2, infinite=False, return_params=True,
                                config=config(ahead, skip_bad_samples=True))
        assert [b["sources"] for b in skipping] == expected
        assert len(skipping.skipped) == 1 and key in skipping.skipped[0][0]


def test_assemble_ahead_must_not_be_negative():
    with pytest.raises(PipelineConfigError, match="assemble_ahead = -1: need >= 0"):
        PipelineConfig(assemble_ahead=-1).validate()
    assert PipelineConfig().assemble_ahead == 0


# --- the thread ---------------------------------------------------------------------------

def test_items_come_in_order_then_the_error_that_ended_the_thread():
    def produce(put, stopping):
        put(1)
        put(2)
        raise ValueError("stage B failed")

    made = AheadThread(produce, depth=1, name="test-ahead")
    assert [made.get(), made.get()] == [1, 2]
    for _ in range(2):
        with pytest.raises(ValueError, match="stage B failed"):
            made.get()
    made.close()


@pytest.mark.parametrize("depth", [1, 2])
def test_the_thread_makes_at_most_depth_items_the_caller_has_not_taken(depth):
    """Counting the one in the making: with depth 1 it makes the next batch while the
    caller's step runs on the last one, then waits."""
    begun = []

    def produce(put, stopping):
        for number in range(10):
            begun.append(number)
            put(number)

    made = AheadThread(produce, depth=depth, name="test-ahead")
    wait_until(lambda: len(begun) >= depth)
    time.sleep(0.2)                       # time to go beyond, which it must not
    assert len(begun) == depth
    for taken in range(3):
        assert made.get() == taken
        wait_until(lambda: len(begun) >= depth + taken + 1)
        time.sleep(0.2)
        assert len(begun) == depth + taken + 1
    made.close()


def test_a_thread_that_returns_ends_in_stop_iteration():
    made = AheadThread(lambda put, stopping: put("only"), depth=3, name="test-ahead")
    assert made.get() == "only"
    with pytest.raises(StopIteration):
        made.get()
    made.close()


@pytest.mark.parametrize("where", ["put", "polling"])
def test_close_reaches_a_thread_waiting_for_room_or_for_its_input(where):
    ended = threading.Event()

    def produce(put, stopping):
        try:
            if where == "put":
                while True:
                    put("item")
            while not stopping():
                time.sleep(0.01)
            raise Stopped
        finally:
            ended.set()

    made = AheadThread(produce, depth=2, name="test-ahead")
    time.sleep(0.2)
    began = time.monotonic()
    made.close()
    assert ended.is_set() and time.monotonic() - began < 2
    assert not [t for t in threading.enumerate() if t.name == "test-ahead"]


def test_waiting_for_stage_a_ends_in_stopped_once_asked_to_stop():
    """The loader's thread waits for stage A through `get(stopping)` (both producers' get)."""
    from tcore.pipelines.producer import _QueuedProducer

    waiting = _QueuedProducer(depth=1)          # stage A has nothing for it yet
    asked = time.monotonic() + 0.3
    with pytest.raises(Stopped):
        waiting.get(lambda: time.monotonic() > asked)
    assert time.monotonic() >= asked
    waiting._queue.put("batch")
    assert waiting.get(lambda: True) == "batch"   # what is there is taken first
