"""Stage A in a process of its own (`producer = "process"`, the default on a GPU): the same
batches and resume as in a thread, stage A's errors raised in the training process naming
the sample, and a producer process that dies is reported instead of waited for."""
import os
import signal
import time

import pytest
import torch

from test_pipeline_loader import _drop_one_json
from test_pipeline_resume import digest, small_config
from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.loader import BadSampleError, build_loader
from tcore.pipelines.producer import _picklable


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


def test_stage_a_errors_in_the_process_name_the_sample(synth_shards, tmp_path):
    key = _drop_one_json(synth_shards, tmp_path)
    config = PipelineConfig(producer="process")
    config.views.n_local = 0
    with pytest.raises(BadSampleError, match=f"shard-000000.tar:{key}: a component is missing"):
        next(build_loader([tmp_path / "copy"], batch_size=4, config=config))


def test_a_killed_producer_process_is_reported(synth_shards):
    loader = build_loader([synth_shards], batch_size=2, config=small_config("process"),
                          prefetch=1)
    next(loader)
    os.kill(loader._producer._process.pid, signal.SIGKILL)
    started = time.time()
    with pytest.raises(RuntimeError, match="stage A process .* exited with code -9"):
        for _ in range(10):          # the batches already in the pipe come first
            next(loader)
    assert time.time() - started < 30
    loader.close()


def test_closing_the_loader_ends_the_producer_process(synth_shards):
    loader = build_loader([synth_shards], batch_size=2, config=small_config("process"))
    next(loader)
    process = loader._producer._process
    loader.close()
    assert process.poll() is not None


def test_errors_that_do_not_pickle_cross_as_runtime_errors():
    class LocalError(Exception):        # a local class: pickle cannot find it by name
        pass

    try:
        raise LocalError("bad frame")
    except LocalError as raised:
        sent = _picklable(raised)
    assert isinstance(sent, RuntimeError)
    assert "LocalError: bad frame" in str(sent) and "Traceback" in str(sent)
    error = BadSampleError("sample a.tar:k: broken")
    assert _picklable(error) is error
