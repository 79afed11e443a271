"""The live view of a search (search/progress.py): counts, best so far, ETA, and what a captured log shows."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from search.progress import SearchProgress, format_duration, format_params
from search.publish.outputs import summary_lines

NAMES = ["train.lr", "model.units"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(total: int = 4, mode: str = "max") -> tuple[SearchProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return SearchProgress(total, "val_acc", mode, max_epochs=3, names=NAMES, stream=out, live=False,
                          clock=clock), out, clock


def test_counts_best_and_outcomes_follow_the_events():
    p, _, _ = _progress()
    p.started("a", 0, {"train.lr": 0.3, "model.units": 16})
    p.started("b", 1, {"train.lr": 0.01, "model.units": 8})
    for epoch, value in ((1, 0.5), (2, 0.9), (3, 0.8)):            # a peaks at epoch 2 then declines
        p.result("a", {"epoch": epoch, "val_acc": value})
    p.result("b", {"epoch": 1, "val_acc": 0.2})
    assert p.counts() == {"running": 2, "finished": 0, "stopped_early": 0, "failed": 0}
    p.ended("a", "finished")
    p.ended("b", "stopped_early")
    p.started("c", 2, {"train.lr": 9.0, "model.units": 8})
    p.result("c", {"epoch": 1, "val_acc": float("nan")})          # a diverged epoch is no value
    p.ended("c", "failed", error="diverged at epoch 1")
    assert p.counts() == {"running": 0, "finished": 1, "stopped_early": 1, "failed": 1}
    best = p.best()
    assert best is not None and best.number == 0 and best.value == 0.9   # the best epoch, not the last


def test_min_mode_ranks_lower_values_first():
    p, _, _ = _progress(mode="min")
    for key, number, value in (("a", 0, 0.4), ("b", 1, 0.1)):
        p.started(key, number, {})
        p.result(key, {"epoch": 1, "val_acc": value})
    assert p.best().number == 1


def test_a_captured_log_gets_one_line_per_ended_trial_and_one_per_new_best():
    p, out, clock = _progress(total=3)
    for key, number, value in (("a", 0, 0.7), ("b", 1, 0.6), ("c", 2, 0.9)):
        p.started(key, number, {"train.lr": 0.1 * (number + 1), "model.units": 8})
        clock.now += 10
        p.result(key, {"epoch": 3, "val_acc": value})
        p.ended(key, "finished")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 + 2                                     # trials 0 and 2 each became the best
    assert lines[0].startswith("[1/3] trial 0 finished: val_acc 0.7000") and "ETA" in lines[0]
    assert lines[1] == "      new best: trial 0  lr=0.1 units=8"
    assert lines[-1] == "      new best: trial 2  lr=0.3 units=8"
    assert "[3/3] trial 2 finished" in lines[-2] and "ETA" not in lines[-2]   # nothing left to wait for
    assert all(len(line) <= 120 for line in lines)


def test_eta_scales_the_pace_so_far_to_the_trial_epochs_left():
    p, _, clock = _progress(total=4)
    p.started("a", 0, {})
    clock.now = 30.0
    p.result("a", {"epoch": 3, "val_acc": 0.5})
    p.ended("a", "finished")                                       # 3 trial-epochs in 30 s
    assert p.eta_s() == 30.0 * 9 / 3                               # 3 more trials of 3 epochs each


def test_the_terminal_block_shows_running_and_recent_trials():
    p, _, _ = _progress()
    p.started("a", 0, {"train.lr": 0.3, "model.units": 16})
    p.result("a", {"epoch": 1, "val_acc": 0.5})
    p.started("b", 1, {"train.lr": 0.01, "model.units": 8})
    p.result("b", {"epoch": 2, "val_acc": 0.6})
    p.ended("b", "stopped_early")
    lines = p.lines()
    assert lines[0].startswith("[1/4] finished 0  stopped 1  failed 0  running 1")
    assert lines[1] == "best val_acc 0.6000  trial 1  lr=0.01 units=8"
    assert any(line.strip().startswith("running  trial 0") and "epoch 1/3" in line for line in lines)
    assert any(line.strip().startswith("stopped  trial 1") for line in lines)


def test_a_live_block_renders_on_a_terminal_like_stream():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with SearchProgress(2, "val_acc", "max", 1, NAMES, stream=out) as p:
        assert p.live is True
        p.started("a", 0, {"train.lr": 0.3})
        p.result("a", {"epoch": 1, "val_acc": 0.5})
        p.ended("a", "finished")
    assert "best val_acc 0.5000  trial 0  lr=0.3" in out.getvalue()


def test_formatting_helpers():
    assert format_params({"model.units": 16, "train.lr": 0.123456}, ["train.lr", "model.units"]) == \
        "lr=0.1235 units=16"
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"


@dataclass
class _Trial:
    trial_id: str
    number: int
    metric: float
    epochs: int
    outcome: str
    params: dict[str, Any]
    error: str | None = None


@dataclass
class _Result:
    trials: list[_Trial]
    model_uri: str | None = "models:/x-capsnet@best"
    experiment: Any = field(default=None)
    confirmed: dict[int, dict[str, float]] = field(default_factory=dict)
    raw_best: Any = None

    @property
    def best(self) -> _Trial:
        return self.trials[0]


def test_the_summary_ranks_trials_and_gives_every_path_and_link():
    class Search:
        metric, space = "val_acc", {"train.lr": None, "model.units": None}

    class Exp:
        search = Search()

    trials = [_Trial(f"t{i}", i, 0.9 - i / 100, 3, "finished", {"train.lr": 0.1, "model.units": 8})
              for i in range(12)]
    lines = summary_lines(_Result(trials, experiment=Exp()), export_path="x.best.yaml", csv_path="x.csv",
                          links={"search run (MLflow)": "http://h/#/experiments/1/runs/p"}, report_path="r.html")
    text = "\n".join(lines)
    assert "trials ranked by their best val_acc (top 10 of 12)" in text
    assert sum(line.startswith("  ") and line.split()[0].isdigit() for line in lines) == 10
    assert "best: trial 0, val_acc 0.9000" in text
    for expected in ("x.best.yaml", "x.csv", "r.html", "models:/x-capsnet@best", "drcaps train --config x.best.yaml",
                     "http://h/#/experiments/1/runs/p"):
        assert expected in text


def test_a_failed_trial_says_why_in_the_ranking():
    from search.publish.outputs import outcome_label

    assert outcome_label("failed", "Traceback...\ndrcapsnet.errors.DivergedError: diverged at epoch 3") == \
        "failed: diverged at epoch 3"
    assert outcome_label("stopped_early", None) == "stopped_early"
    assert outcome_label("failed", None) == "failed"
