"""`train.step_stream` off a GPU: nothing changes (the CUDA side is tests/test_gpu.py's)."""
import pytest
import torch

from tcore.step_stream import step_stream


def test_the_step_stream_changes_nothing_on_the_cpu_and_refuses_unknown_kinds():
    for kind in ("default", "high_priority"):
        with step_stream(kind, torch.device("cpu")) as stream:
            assert stream is None
    with pytest.raises(ValueError, match=r"train.step_stream must be one of .*'fastest'"):
        with step_stream("fastest", torch.device("cpu")):
            pass
