"""train.minutes (retinanet.train.budget): the run's length follows the measured speed so that training ends when
the budget is spent; the schedule is refitted to it; the time spent and the length travel with the checkpoints."""

import pytest
import torch
from test_train import interrupt_at, read_log, tiny_config, tiny_loader, tiny_model

from retinanet.model.checkpoint import load_checkpoint
from retinanet.train.budget import CHECK_EVERY, FIRST_CHECK, TimeBudget
from retinanet.train.loop import TrainingInterrupted, train
from retinanet.train.optim import build_scheduler, fit_schedule


def test_the_first_estimate_fills_the_budget_at_the_measured_speed():
    budget = TimeBudget(seconds=10.0)
    assert budget.check(FIRST_CHECK - 1, 1.9, max_iters=1000) is None  # too early to say
    # 20 iterations in 2 s: 0.1 s each, 8 s left -> 80 more
    assert budget.check(FIRST_CHECK, 2.0, max_iters=1000) == FIRST_CHECK + 80
    # not a checking iteration
    assert budget.check(FIRST_CHECK + 1, 2.1, max_iters=100) is None


def test_later_estimates_use_the_speed_since_the_first_check_and_ignore_small_moves():
    budget = TimeBudget(seconds=10.0)
    assert budget.check(20, 2.0, max_iters=1000) == 100
    # the next 20 iterations took 4 s (0.2 s each, the speed since the first check): 4 s left hold 20 more
    assert budget.check(40, 6.0, max_iters=100) == 60
    # 20 more at 0.1 s: the mean since the first check is 0.15 s; 2 s left hold 13 more
    assert budget.check(60, 8.0, max_iters=60) == 73
    # the budget is spent at iteration 80: the run ends there
    assert budget.check(80, 10.0, max_iters=73) == 80
    assert budget.check(100, 10.5, max_iters=100) is None  # it already ends here
    budget = TimeBudget(seconds=10.0)
    budget.check(20, 2.0, max_iters=1000)
    assert budget.check(40, 4.0, max_iters=101) is None  # 60 more at 0.1 s = 100: within 2% of 101


def test_a_resumed_budget_counts_the_time_spent_before():
    budget = TimeBudget(seconds=10.0, spent=6.0, start=50)
    assert budget.check(50 + FIRST_CHECK, 2.0, max_iters=1000) == 50 + FIRST_CHECK + 20  # 2 s left at 0.1 s
    assert budget.used(2.0) == 8.0
    spent = TimeBudget(seconds=10.0, spent=9.0, start=50)
    assert spent.check(50 + FIRST_CHECK + CHECK_EVERY, 3.0, max_iters=1000) == 50 + FIRST_CHECK + CHECK_EVERY


def test_fit_schedule_refits_the_cosine_to_the_new_length():
    cfg = tiny_config(max_iters=1000, lr_schedule="cosine", warmup_iters=0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(opt, cfg)
    assert scheduler.lr_lambdas[0](50) == pytest.approx(0.99, abs=0.01)
    cfg.max_iters = 100
    fit_schedule(scheduler, cfg)
    assert scheduler.lr_lambdas[0](50) == pytest.approx(0.5) and scheduler.lr_lambdas[0](100) == pytest.approx(0.0)


def test_a_run_with_minutes_ends_where_its_budget_says_and_resumes_with_its_length(tmp_path):
    cfg = tiny_config(
        max_iters=100_000, minutes=0.05, lr_schedule="cosine", log_every=10, checkpoint_every=1000, warmup_iters=2
    )
    folder = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):  # stopped after the first estimate, as a preempted job
        train(interrupt_at(tiny_model(), {FIRST_CHECK + 2}), tiny_loader(), cfg, folder)
    saved = load_checkpoint(folder / "last.pt")
    length = saved["train_config"]["max_iters"]
    assert FIRST_CHECK < length < 100_000 and saved["train_config"]["minutes"] == 0.05
    assert saved["extra"]["train_seconds"] > 0
    notes = (folder / "train.log").read_text()
    assert f"the run now ends at iteration {length}" in notes

    cfg = tiny_config(
        max_iters=100_000, minutes=0.05, lr_schedule="cosine", log_every=10, checkpoint_every=1000, warmup_iters=2
    )
    result = train(tiny_model(), tiny_loader(), cfg, folder, resume=folder / "last.pt")
    assert result["iteration"] == cfg.max_iters < 100_000  # ended at the length its budget set, not the config's
    final = load_checkpoint(folder / "last.pt")
    assert final["iteration"] == final["train_config"]["max_iters"] == cfg.max_iters
    assert final["extra"]["train_seconds"] >= saved["extra"]["train_seconds"]
    assert max(r["iter"] for r in read_log(folder)) == cfg.max_iters
