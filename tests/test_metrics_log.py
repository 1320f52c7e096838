"""The training log's rate and data-wait fraction, on a clock the test sets."""
import json

import pytest

from tcore.metrics_log import MetricsLogger


class SetClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_data_wait_fraction_is_wait_over_wall_time_since_the_last_log(tmp_path):
    clock = SetClock()
    logger = MetricsLogger(tmp_path, start_step=0, end_step=10, samples_per_step=8,
                           progress=False, tensorboard=False, clock=clock)
    losses = {"total": 1.0}
    for _ in range(4):                          # 4 steps over 2 s, 0.5 s of it in next()
        logger.add_data_wait(0.125)
    clock.now = 2.0
    logger.log([(s, losses) for s in (1, 2, 3, 4)], {"lr": 1e-3})
    clock.now = 3.0                             # then 1 step in 1 s, no waiting
    logger.log([(5, losses)], {"lr": 1e-3})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert "data_wait_fraction" not in records[0]           # only each log's last step
    assert records[3]["data_wait_fraction"] == pytest.approx(0.25)
    assert records[3]["samples_per_s"] == pytest.approx(4 * 8 / 2.0)
    assert records[4]["data_wait_fraction"] == 0.0          # reset after each log
    assert records[4]["samples_per_s"] == pytest.approx(8.0)
