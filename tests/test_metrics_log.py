"""The training log: rate and data-wait fraction on a clock the test sets, schedule values
and skipped samples on each log's last record, the loss buffer's NaN check, and the
truncation a resumed run does."""
import json
import math

import pytest
import torch

from tcore.metrics_log import (LossHistory, MetricsLogger, NonFiniteLossError, read_metrics,
                               truncate_metrics)


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
    logger.log([(5, losses)], {"lr": 2e-3}, skipped_samples=2)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert "data_wait_fraction" not in records[0]           # only each log's last step
    assert records[3]["data_wait_fraction"] == pytest.approx(0.25)
    assert records[3]["samples_per_s"] == pytest.approx(4 * 8 / 2.0)
    assert records[4]["data_wait_fraction"] == 0.0          # reset after each log
    assert records[4]["samples_per_s"] == pytest.approx(8.0)
    # The schedule values of the log step, and the skipped samples where the loader counts them.
    assert [r.get("sched/lr") for r in records] == [None, None, None, 1e-3, 2e-3]
    assert [r.get("skipped_samples") for r in records] == [None] * 4 + [2]


def test_drain_reduces_checks_and_names_the_term_not_the_total():
    history = LossHistory()
    weight = torch.ones((), requires_grad=True)
    history.add(1, {"total": 3 * weight, "dino": 2 * weight})
    history.add(2, {"total": 5 * weight, "dino": 4 * weight})
    assert not any(v.requires_grad for step in history.losses for v in step.values())
    # `reduce` (the all-reduce mean over ranks in training) sees the [steps, terms] tensor.
    assert history.drain(lambda t: t / 2) == [(1, {"total": 1.5, "dino": 1.0}),
                                              (2, {"total": 2.5, "dino": 2.0})]
    assert history.drain() == []                                    # the buffer was cleared
    history.add(3, {"total": weight * 1.0, "dino": weight * 0.5})
    history.add(4, {"total": weight * math.inf, "dino": weight * math.nan})
    history.add(5, {"total": weight * 1.0, "dino": weight * 1.0})
    with pytest.raises(NonFiniteLossError, match="step 4: dino = nan") as info:
        history.drain()
    assert info.value.good_records == [(3, {"total": 1.0, "dino": 0.5})]
    assert history.drain() == []


def test_truncate_metrics_keeps_the_steps_a_resumed_run_does_not_redo(tmp_path):
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, 3)                   # no log yet: nothing to do
    assert not path.exists()
    lines = [json.dumps({"step": s, "loss/total": float(s)}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "loss/to')     # cut short by a kill
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_tensorboard_holds_one_value_per_step_after_a_resume_from_an_older_checkpoint(tmp_path):
    """A run killed after logging step 5 resumes from checkpoint 4: metrics.jsonl is cut back
    to step 4, and TensorBoard's step 5 of the first start is hidden (it once read 1..5, 5, 6)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log(start, steps, value):
        logger = MetricsLogger(tmp_path, start_step=start, end_step=10, samples_per_step=1,
                               progress=False)
        logger.log([(step, {"total": value + step}) for step in steps], {"lr": 1e-3})
        logger.close()
    log(0, range(1, 6), 0.0)
    truncate_metrics(tmp_path / "metrics.jsonl", 4)
    log(4, (5, 6), 100.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss/total")
    assert [event.step for event in scalars] == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in scalars][-2:] == [105.0, 106.0]   # the resumed run's
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
