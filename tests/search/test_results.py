"""search/tune/results.py: Tune's results -> ranked TrialSummary objects (pure, no Ray running)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from search.tune.results import summaries


@dataclass
class _Result:                      # the fields of ray.tune.Result that summaries() reads
    metrics_dataframe: pd.DataFrame | None
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=lambda: {"train.lr": 0.01, "drcaps_trial": 0})
    path: str = "/tmp/search/trial_a"
    error: Exception | None = None


def _df(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"epoch": range(1, len(values) + 1), "val_acc": values, "trial_id": "a"})


def test_a_result_file_an_epoch_short_of_the_last_result_counts_the_last_epoch() -> None:
    # The driver was killed after Tune's state recorded epoch 3 and before result.json reached the storage folder.
    last = {"epoch": 3, "val_acc": 0.9, "trial_id": "a", "config": {"train.lr": 0.01}}
    [t] = summaries([_Result(_df([0.5, 0.6]), last)], "val_acc", "max", epochs=3)
    assert (t.outcome, t.epochs, t.metric, t.number) == ("finished", 3, 0.9, 0)
    assert t.metrics["epoch"] == 3


def test_a_complete_result_file_is_read_as_it_is() -> None:
    last = {"epoch": 3, "val_acc": 0.55, "trial_id": "a"}
    [t] = summaries([_Result(_df([0.5, 0.7, 0.55]), last)], "val_acc", "max", epochs=3)
    assert (t.outcome, t.epochs, t.metric) == ("finished", 3, 0.7)
    assert t.metrics["epoch"] == 2


def test_a_trial_the_scheduler_stopped_stays_stopped_early_and_ranks_by_its_best_epoch() -> None:
    early = _Result(_df([0.5]), {"epoch": 1, "val_acc": 0.5, "trial_id": "b"}, path="/tmp/search/trial_b")
    full = _Result(_df([0.3, 0.4, 0.45]), {"epoch": 3, "val_acc": 0.45, "trial_id": "a"})
    ranked = summaries([full, early], "val_acc", "max", epochs=3)
    assert [(t.trial_id, t.outcome) for t in ranked] == [("b", "stopped_early"), ("a", "finished")]


def test_a_trial_with_no_epoch_and_no_file_is_stopped_early_without_a_value() -> None:
    [t] = summaries([_Result(None, {"trial_id": "a"})], "val_acc", "max", epochs=3)
    assert t.outcome == "stopped_early" and math.isnan(t.metric) and t.epochs == 0
