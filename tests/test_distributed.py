"""tcore.distributed across two real gloo processes (torchrun's environment variables): the
loss mean over ranks that logging and the NaN stop rely on."""
import json
import os
import socket
import subprocess
import sys

CHILD = r"""
import json, math, sys, torch
from tcore.distributed import all_reduce_mean_, barrier, init_distributed, shutdown
from tcore.metrics_log import LossHistory, NonFiniteLossError
info = init_distributed("cpu")
out = {"rank": info.rank, "world_size": info.world_size, "is_main": info.is_main,
       "enabled": info.enabled, "device": str(info.device)}
out["mean"] = all_reduce_mean_(torch.tensor([1.0, 10.0]) * (info.rank + 1), info).tolist()
history = LossHistory()
history.add(1, {"total": torch.tensor(2.0 + 4 * info.rank)})
history.add(2, {"total": torch.tensor(math.nan if info.rank == 1 else 1.0)})  # rank 1 only
try:
    history.drain(lambda t: all_reduce_mean_(t, info))
except NonFiniteLossError as exc:
    out["stopped_at"], out["good"] = exc.step, exc.good_records
barrier(info)
shutdown(info)
json.dump(out, open(sys.argv[1], "w"))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_see_the_mean_and_stop_at_the_same_step(tmp_path):
    port = str(_free_port())
    children = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)   # PYTHONPATH passed through
        children.append(subprocess.Popen([sys.executable, "-c", CHILD,
                                          str(tmp_path / f"rank{rank}.json")], env=env))
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, got in enumerate(results):
        assert (got["rank"], got["world_size"], got["enabled"]) == (rank, 2, True)
        assert got["is_main"] == (rank == 0) and got["device"] == "cpu"
        assert got["mean"] == [1.5, 15.0]                 # (1 + 2) / 2 and (10 + 20) / 2
        # Rank 0's own losses are finite, yet it stops with rank 1, at the same step.
        assert got["stopped_at"] == 2 and got["good"] == [[1, {"total": 4.0}]]
