"""Stage A in a process of its own (`producer = "process"`, the default on a GPU): the same
batches and resume as in a thread, stage A's errors raised in the training process naming
the sample, a producer process that dies reported instead of waited for (and replaced on
the next call, losing no batch), and the child running the parent's tcore whatever the
working directory holds."""
import os
import signal
import tempfile
import threading
import time

import pytest
import torch

from test_pipeline_loader import _drop_one_json
from test_pipeline_resume import digest, small_config
from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.loader import BadSampleError, build_loader
from tcore.pipelines.producer import _picklable, start_producer


def _one_pass(shards, producer: str) -> tuple[int, list[str]]:
    loader = build_loader([shards], batch_size=5, config=small_config(producer), seed=4,
                          infinite=False, num_threads=1)
    return len(loader), [digest(batch) for batch in loader]


def test_process_gives_the_threads_batches_and_resumes(synth_shards):
    # 12 samples in batches of 5: the last batch of the pass has 2
    assert _one_pass(synth_shards, "process") == _one_pass(synth_shards, "thread")
    loader = build_loader([synth_shards], batch_size=3, config=small_config("process"),
                          seed=2, prefetch=3)
    next(loader)
    state = loader.state_dict()
    rest = [digest(next(loader)) for _ in range(5)]     # into the second epoch
    loader.load_state_dict(state)          # a new producer process, from the saved state
    assert [digest(next(loader)) for _ in range(5)] == rest
    loader.close()


def _run_index_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("tcore-pass-")}


@pytest.mark.parametrize("producer", ["thread", "process"])
def test_the_runs_index_files_go_with_the_loader(synth_shards, producer):
    """Passes in runs of 2 (shards of 5, 5 and 2) read runs' index files the loader writes;
    a producer process ends by SIGKILL, so the loader removes them when it closes, and
    after a one-pass epoch, which closes it."""
    config = small_config(producer)
    config.shuffle_buffer, config.pass_chunk = 4, 2
    before = _run_index_dirs()
    loader = build_loader([synth_shards], batch_size=5, config=config, seed=4, num_threads=1)
    next(loader)
    made = _run_index_dirs() - before
    assert len(made) == 1
    runs = os.path.join(tempfile.gettempdir(), made.pop(), "runs")
    assert sorted(os.listdir(runs))[0].startswith("run-")
    loader.close()
    assert _run_index_dirs() == before
    one_pass = build_loader([synth_shards], batch_size=5, config=config, seed=4,
                            num_threads=1, infinite=False)
    assert sum(batch["labels"].shape[0] for batch in one_pass) == 12
    assert _run_index_dirs() == before
    # `bench data --loader stage-a` runs stage A from a loader that never starts: its
    # close() removes the directory too.
    from tcore.bench.data import build_named_loader

    alone = build_named_loader("stage-a", str(synth_shards), torch.device("cpu"), 1, 5, 4,
                               config=config)
    next(alone)
    assert len(_run_index_dirs() - before) == 1
    alone.close()
    assert _run_index_dirs() == before


def test_stage_a_errors_in_the_process_name_the_sample(synth_shards, tmp_path):
    key = _drop_one_json(synth_shards, tmp_path)
    config = PipelineConfig(producer="process")
    config.views.n_local = 0
    with pytest.raises(BadSampleError, match=f"shard-000000.tar:{key}: a component is missing"):
        next(build_loader([tmp_path / "copy"], batch_size=4, config=config))


@pytest.mark.parametrize("prefetch", [1, 3])
def test_a_killed_producer_process_is_reported_then_replaced(synth_shards, prefetch):
    def build():
        return build_loader([synth_shards], batch_size=2, config=small_config("process"),
                            prefetch=prefetch, seed=9)

    reference = build()
    expected = [digest(next(reference)) for _ in range(16)]
    reference.close()
    loader = build()
    got = [digest(next(loader))]
    os.kill(loader._producer._process.pid, signal.SIGKILL)
    started = time.time()
    with pytest.raises(RuntimeError, match="stage A process .* killed by signal 9"):
        for _ in range(12):          # the batches already in the pipe come first
            got.append(digest(next(loader)))
    assert time.time() - started < 30
    # The loader closed itself; the next call starts a new process after the last batch
    # returned, so the stream goes on as if nothing had happened.
    while len(got) < len(expected):
        got.append(digest(next(loader)))
    assert got == expected
    loader.close()


def test_closing_the_loader_ends_the_producer_process(synth_shards):
    loader = build_loader([synth_shards], batch_size=2, config=small_config("process"))
    next(loader)
    process = loader._producer._process
    loader.close()
    assert process.poll() is not None


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_failed_stage_a_raises_on_every_later_get_instead_of_waiting(kind):
    """A stage A that failed (here: no spec at all, so it fails at once) raises its error
    from `get()`, and again from every later call: nothing waits on a stage A that has
    stopped."""
    producer = start_producer(kind, None, depth=2)
    try:
        errors = []

        def two_gets():
            for _ in range(2):
                try:
                    producer.get()
                except Exception as error:     # collected, checked below
                    errors.append(error)

        caller = threading.Thread(target=two_gets, daemon=True)
        caller.start()
        caller.join(timeout=30)
        assert not caller.is_alive(), "the second get() waited for a stopped stage A"
        assert len(errors) == 2 and errors[0] is errors[1], errors
        # stage A's own error (reading a None spec), across the process boundary too
        assert isinstance(errors[0], AttributeError) and "NoneType" in str(errors[0]), errors
    finally:
        producer.close()


class TwoArgumentError(Exception):
    """Pickles, but does not unpickle: pickle calls it back with the one args tuple."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")


def test_errors_that_do_not_survive_pickling_cross_as_runtime_errors():
    class LocalError(Exception):        # a local class: pickle cannot find it by name
        pass

    for error in (LocalError("bad frame"), TwoArgumentError("a.tar", "bad frame")):
        try:
            raise error
        except Exception as raised:
            sent = _picklable(raised)
        assert isinstance(sent, RuntimeError)
        assert f"{type(error).__name__}: " in str(sent) and "bad frame" in str(sent)
        assert "Traceback" in str(sent)
    error = BadSampleError("sample a.tar:k: broken")
    assert _picklable(error) is error and not getattr(error, "__notes__", None)
    try:
        raise KeyError("frames")
    except KeyError as raised:
        sent = _picklable(raised)       # pickles: goes as itself, with the child's stack
    assert isinstance(sent, KeyError) and "in the stage A process" in sent.__notes__[0]


def test_the_process_runs_the_parents_tcore_whatever_the_working_directory(synth_shards,
                                                                           tmp_path):
    """A `tcore` package in the working directory that is not the one imported (a source
    checkout's, say) is not what the child imports."""
    shadow = tmp_path / "tcore" / "pipelines"
    shadow.mkdir(parents=True)
    (tmp_path / "tcore" / "__init__.py").write_text("raise ImportError('the shadow tcore')\n")
    (shadow / "__init__.py").write_text("")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        loader = build_loader([synth_shards], batch_size=2, config=small_config("process"))
        batch = next(loader)
        loader.close()
    finally:
        os.chdir(here)
    assert batch["global_crops"].shape[0] == 4
