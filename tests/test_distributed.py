"""Two real gloo processes started with torchrun's environment variables: the loss mean over
ranks that logging and the NaN stop rely on, and the DINO centers' mean over ranks."""
import torch

from tcore import losses
from processes import run_two_ranks

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


def test_two_ranks_see_the_mean_and_stop_at_the_same_step(tmp_path):
    results = run_two_ranks(CHILD, tmp_path)
    for rank, got in enumerate(results):
        assert (got["rank"], got["world_size"], got["enabled"]) == (rank, 2, True)
        assert got["is_main"] == (rank == 0) and got["device"] == "cpu"
        assert got["mean"] == [1.5, 15.0]                 # (1 + 2) / 2 and (10 + 20) / 2
        # Rank 0's own losses are finite, yet it stops with rank 1, at the same step.
        assert got["stopped_at"] == 2 and got["good"] == [[1, {"total": 4.0}]]


CENTER_CHILD = r"""
import json, sys, torch
from tcore import losses
from tcore.distributed import init_distributed, shutdown
info = init_distributed("cpu")
center = torch.full((1, 4), 0.5)
logits = torch.arange(12.0).reshape(3, 4) if info.rank == 0 else torch.full((5, 4), -2.0)
losses.update_center(center, logits, 0.9)
shutdown(info)
json.dump(center[0].tolist(), open(sys.argv[1], "w"))
"""


def test_center_takes_the_mean_of_the_ranks_batch_means(tmp_path):
    """Different batches on the two ranks (3 rows and 5, as the masked patch counts differ):
    both end with m * c + (1 - m) * the mean of the two batch means (METHOD.md section 5:
    centering over the batch mean, the same centers on every rank)."""
    mean_of_means = (torch.arange(12.0).reshape(3, 4).mean(0) + torch.full((4,), -2.0)) / 2
    for center in run_two_ranks(CENTER_CHILD, tmp_path):
        torch.testing.assert_close(torch.tensor(center), 0.9 * 0.5 + 0.1 * mean_of_means)
    alone = torch.full((1, 4), 0.5)          # one process: its own batch mean
    losses.update_center(alone, torch.full((5, 4), -2.0), 0.9)
    torch.testing.assert_close(alone[0], torch.full((4,), 0.9 * 0.5 + 0.1 * -2.0))
