"""Confirmation of a Pareto front (issues 16 and 18), on hand-made records: which members search.confirm trains again
(search/tune/confirm.py ``candidates``), and the pick on their confirmed values (search/publish/front.py
``front_pick``), with what NAME.pareto.yaml and the summary say about it. The real search: tests/search/
test_multi_objective.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from search.experiment import experiment_from_dict
from search.publish import SearchResult, pick
from search.publish.front import front_of, front_pick, write_front_yaml
from search.publish.outputs import confirmation_lines
from search.space import trial_run
from search.tune import ConfirmRun, SearchRecords, TrialSummary
from search.tune.confirm import candidates, starting_line

# name: (val_acc, params), trial number = position. Feasible under params <= 1000: a, b, c, e (d is not); c is
# dominated by a. The front ranked knee first is b, a, e (tests/search/test_front.py works it out).
VALUES = {"a": (0.9, 500), "b": (0.8, 200), "c": (0.7, 600), "d": (0.95, 2000), "e": (0.6, 100)}
NUMBER = {name: i for i, name in enumerate(VALUES)}


def _records(tmp: Path, confirmations: list[tuple[str, int, float, str]] = (), **search: object) -> SearchRecords:
    raw = {"name": "mo", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"device": "cpu"},
           "search": {"objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
                      "constraints": {"params": {"max": 1000}}, "confirm": {"top_k": 2, "seeds": 2},
                      "space": {"model.units": {"type": "categorical", "choices": [4, 8, 12, 16, 20]}}, **search},
           "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    trials = [TrialSummary(name, {"model.units": 4 * (i + 1)}, acc, 2, "finished",
                           {"epoch": 2.0, "val_acc": acc, "params": float(params)}, number=i, run_id=f"run-{name}")
              for i, (name, (acc, params)) in enumerate(VALUES.items())]
    runs = tuple(ConfirmRun(NUMBER[name], seed, value, outcome) for name, seed, value, outcome in confirmations)
    return SearchRecords(experiment_from_dict(raw, base_dir=tmp), sorted(trials, key=lambda t: -t.metric),
                         "sqlite:///x.db", "parent", "study", "sqlite:///o.db", str(tmp), runs)


def _ids(trials: list[TrialSummary]) -> list[str]:
    return [t.trial_id for t in trials]


def test_the_configs_confirmed_are_the_first_front_members_by_the_pick_rule(tmp_path):
    records = _records(tmp_path)
    s = records.experiment.search
    assert _ids(candidates(records.trials, s, 2)) == ["b", "a"]            # not d and a, the top 2 by val_acc
    assert _ids(candidates(records.trials, s, 5)) == ["b", "a", "e"]       # the front has only 3
    rule = _records(tmp_path, pick={"maximize": "val_acc", "subject_to": {"params": {"max": 150}}})
    assert _ids(candidates(rule.trials, rule.experiment.search, 2)) == ["e", "a"]
    one = _records(tmp_path, objectives=[], metric="val_acc", mode="max", constraints={}, pick="knee")
    assert _ids(candidates(one.trials, one.experiment.search, 2)) == ["d", "a"]   # one objective: the top-k


def test_the_starting_line_says_when_the_front_is_smaller_than_top_k(tmp_path):
    records = _records(tmp_path, confirm={"top_k": 5, "seeds": 2})
    s = records.experiment.search
    line = starting_line(s, candidates(records.trials, s, 5), 6, 0)
    assert line == ("confirming the first 3 Pareto front members by search.pick (knee) (the front has only 3; "
                    "search.confirm.top_k is 5) with 2 new seeds each (6 runs)")
    s = _records(tmp_path).experiment.search                              # top_k 2
    two = starting_line(s, candidates(records.trials, s, 2), 2, 2)
    assert two.startswith("confirming the first 2 Pareto front members by search.pick (knee) with 2 new seeds")
    assert two.endswith("(2 runs; 2 done before)")


def test_confirmed_means_can_change_the_pick_and_costs_keep_the_searchs_values(tmp_path):
    # Search values: b (0.8, 200) is the knee. Confirmed: b 0.62, a 0.88. Two points normalise to (0, 1) and (1, 0),
    # a tie the better first objective breaks: a, on its confirmed mean (on the search's, b and a tie the same way).
    records = _records(tmp_path, [("b", 1, 0.61, "finished"), ("b", 2, 0.63, "finished"),
                                  ("a", 1, 0.87, "finished"), ("a", 2, 0.89, "finished")])
    assert front_of(records).pick.trial_id == "b"
    best, stats, problems = front_pick(records)
    assert best.trial_id == "a" and problems == []
    assert stats[NUMBER["a"]]["mean"] == pytest.approx(0.88) and stats[NUMBER["a"]]["n"] == 2
    assert stats[NUMBER["b"]]["mean"] == pytest.approx(0.62)
    assert pick(records) == (best, stats, problems)                       # publish's pick goes through front_pick


def test_a_stated_rule_is_applied_among_the_confirmed_members(tmp_path):
    rule = {"maximize": "val_acc", "subject_to": {"params": {"max": 550}}}
    confirmed = [("a", 1, 0.70, "finished"), ("a", 2, 0.72, "finished"),
                 ("b", 1, 0.80, "finished"), ("b", 2, 0.80, "finished")]
    assert front_pick(_records(tmp_path, pick=rule))[0].trial_id == "a"     # by the search's values
    assert front_pick(_records(tmp_path, confirmed, pick=rule))[0].trial_id == "b"


def test_a_member_that_failed_confirmation_is_reported_and_never_crowned(tmp_path):
    lucky = [("b", 1, 0.99, "finished"), ("b", 2, 0.99, "finished"),
             ("a", 1, 0.85, "finished"), ("a", 2, 0.87, "finished")]
    assert front_pick(_records(tmp_path, lucky))[0].trial_id == "b"        # b would win on its confirmed mean
    failed = [*lucky[:1], ("b", 2, math.nan, "failed"), *lucky[2:]]
    best, stats, problems = front_pick(_records(tmp_path, failed))
    assert best.trial_id == "a" and stats[NUMBER["b"]]["failed"] == 1
    assert problems == [f"trial {NUMBER['b']} failed 1 of its confirmation runs: not crowned"]


def test_when_no_member_finished_its_confirmation_the_search_pick_is_kept_with_a_warning(tmp_path):
    best, stats, problems = front_pick(_records(tmp_path, [("b", 1, math.nan, "failed"),
                                                           ("a", 1, math.nan, "failed")]))
    assert best.trial_id == "b" and set(stats) == {NUMBER["a"], NUMBER["b"]}
    assert len(problems) == 3 and "kept the pick by the search's values, trial 1" in problems[-1]


def test_pareto_yaml_and_summary_carry_the_confirmation(tmp_path):
    records = _records(tmp_path, [("b", 1, 0.61, "finished"), ("b", 2, 0.63, "finished"),
                                  ("a", 1, 0.87, "finished"), ("a", 2, 0.89, "finished")])
    best, stats, _ = front_pick(records)
    exp, front = records.experiment, front_of(records)
    result = SearchResult(exp, best, records.trials, trial_run(exp, best.params, 1, 0), "sqlite:///x.db", "parent",
                          best.run_id, "models:/m@best", "study", "sqlite:///o.db", str(tmp_path),
                          raw_best=front.pick, confirmations=records.confirmations, confirmed=stats,
                          front=front)                        # raw_best: the front's pick, as publish() sets it
    data = yaml.safe_load(write_front_yaml(result, tmp_path / "mo.best.yaml").read_text())
    by_trial = {m["trial"]: m for m in data["front"]}
    assert data["picked_trial"] == NUMBER["a"] and by_trial[NUMBER["a"]]["picked"]
    assert by_trial[NUMBER["a"]]["confirmed"] == {"metric": "val_acc", "mean": pytest.approx(0.88),
                                                  "std": pytest.approx(math.sqrt(2e-4)), "n": 2, "failed": 0}
    assert by_trial[NUMBER["b"]]["confirmed"]["mean"] == pytest.approx(0.62)
    assert "confirmed" not in by_trial[NUMBER["e"]]
    assert by_trial[NUMBER["a"]]["values"] == {"val_acc": 0.9, "params": 500.0}   # the search's values, as ranked
    lines = confirmation_lines(result)
    assert "the first 2 Pareto front members by search.pick knee" in lines[1]
    assert lines[2].startswith(f"  search pick: trial {NUMBER['b']} 0.8000; confirmed: trial {NUMBER['a']} 0.8800")
