"""search/publish/front.py (the front of a search's trials, its pick, hypervolume, YAML and summary lines) and
search/report/front.py (its figures), on hand-made trials whose front, knee and hypervolume are worked out below."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from search import tracking
from search.experiment import experiment_from_dict, load_run_config
from search.publish import SearchResult
from search.publish.front import front_lines, front_of, front_pick, pareto_path, write_front_yaml
from search.report.data import SearchData
from search.report.front import first_objective_study, front_sections
from search.space import trial_run
from search.tune import SearchRecords, TrialSummary

# name: (val_acc, params). Feasible under params <= 1000: a, b, c, e; d is not. c is dominated by a and b.
VALUES = {"a": (0.9, 500), "b": (0.8, 200), "c": (0.7, 600), "d": (0.95, 2000), "e": (0.6, 100)}


def _experiment(tmp: Path, **search: object) -> object:
    raw = {"name": "mo", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"device": "cpu"},
           "search": {"objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
                      "constraints": {"params": {"max": 1000}},
                      "space": {"model.units": {"type": "categorical", "choices": [4, 8, 12, 16, 20]}}, **search},
           "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    return experiment_from_dict(raw, base_dir=tmp)


def _records(tmp: Path, **search: object) -> SearchRecords:
    trials = [TrialSummary(name, {"model.units": 4 * (i + 1)}, acc, 2, "finished",
                           {"epoch": 2.0, "val_acc": acc, "params": float(params)}, number=i, run_id=f"run-{name}")
              for i, (name, (acc, params)) in enumerate(VALUES.items())]
    trials = sorted(trials, key=lambda t: -t.metric)                  # ranked, as summaries() gives them
    trials.append(TrialSummary("f", {"model.units": 4}, float("nan"), 1, "failed", number=5, error="diverged"))
    return SearchRecords(_experiment(tmp, **search), trials, "sqlite:///x.db", "parent", "study", "sqlite:///o.db",
                         str(tmp))


def test_front_is_the_feasible_non_dominated_trials_ranked_knee_first(tmp_path):
    front = front_of(_records(tmp_path))
    # Normalised over the front (min space): a (0, 1), b (1/3, 0.25), e (1, 0): b is the knee; a and e tie at 1,
    # the better first objective first.
    assert [t.trial_id for t in front.members] == ["b", "a", "e"]
    assert front.pick is not None and front.pick.trial_id == "b"
    assert front.infeasible == ("d",)
    assert front.values["c"] == {"val_acc": 0.7, "params": 600.0}


def test_hypervolume_against_a_hand_computed_reference(tmp_path):
    front = front_of(_records(tmp_path))
    # Reference from every scored trial, minimised: val_acc -0.6 + 0.1 * 0.35; params 2000 + 0.1 * 1900.
    assert front.reference == pytest.approx({"val_acc": 0.565, "params": 2190.0})
    # Rectangles from the reference, a (-0.9, 500), b (-0.8, 200), e (-0.6, 100) swept by the first objective.
    assert front.hypervolume == pytest.approx(0.1 * 1690 + 0.2 * 1990 + 0.035 * 2090)


def test_a_stated_pick_rule_ranks_those_meeting_it_first(tmp_path):
    records = _records(tmp_path, pick={"maximize": "val_acc", "subject_to": {"params": {"max": 150}}})
    front = front_of(records)
    assert [t.trial_id for t in front.members] == ["e", "a", "b"]
    assert front_pick(records)[0].trial_id == "e"


def test_a_rule_no_front_trial_meets_crowns_the_first_and_says_so(tmp_path):
    best, stats, problems = front_pick(_records(tmp_path, pick={"maximize": "val_acc",
                                                                 "subject_to": {"params": {"max": 50}}}))
    assert best.trial_id == "a" and stats == {}
    assert len(problems) == 1 and "no trial of the Pareto front meets search.pick" in problems[0]


def test_no_feasible_trial_crowns_the_first_objectives_best(tmp_path):
    best, _, problems = front_pick(_records(tmp_path, constraints={"params": {"max": 10}}))
    assert best.trial_id == "d" and "no trial meets search.constraints" in problems[0]


def _result(tmp: Path) -> SearchResult:
    records = _records(tmp)
    front = front_of(records)
    exp, best = records.experiment, front.pick
    return SearchResult(exp, best, records.trials, trial_run(exp, best.params, 1, 0), "sqlite:///x.db", "parent",
                        best.run_id, "models:/m@best", "study", "sqlite:///o.db", str(tmp), front=front)


def test_pareto_yaml_holds_every_front_config_ranked_with_its_values(tmp_path):
    result = _result(tmp_path)
    path = write_front_yaml(result, tmp_path / "mo.best.yaml")
    assert path == tmp_path / "mo.pareto.yaml" == pareto_path(tmp_path / "mo.best.yaml")
    data = yaml.safe_load(path.read_text())
    assert [m["trial_id"] for m in data["front"]] == ["b", "a", "e"]
    assert [m["rank"] for m in data["front"]] == [1, 2, 3]
    assert [m["picked"] for m in data["front"]] == [True, False, False] and data["picked_trial"] == 1
    assert data["front"][1]["values"] == {"val_acc": 0.9, "params": 500.0}
    assert data["hypervolume"] == pytest.approx(result.front.hypervolume)
    alone = tmp_path / "member.yaml"
    alone.write_text(yaml.safe_dump(data["front"][2]["config"]))
    assert load_run_config(alone).model.units == 20                   # trial e's config, as it trained


def test_summary_lines_show_the_ranked_front_and_the_pick(tmp_path):
    lines = front_lines(_result(tmp_path), tmp_path / "mo.best.yaml")
    table = [line.split() for line in lines if line.startswith("  ") and line.split()[0].rstrip("*").isdigit()]
    assert [(row[0], row[1]) for row in table] == [("1*", "1"), ("2", "0"), ("3", "4")]
    assert any("1 trials outside search.constraints" in line for line in lines)
    assert any(str(tmp_path / "mo.pareto.yaml") in line for line in lines)


def test_first_objective_study_gives_optunas_plots_one_target():
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 100], params={"x": 0.1}, distributions=dist))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"x": 0.2},
                                              distributions=dist,
                                              user_attrs={"intermediate.val_acc": [[1, 0.5], [2, 0.7], [3, 0.6]]}))
    one = first_objective_study(study, "val_acc", "max")
    assert len(one.directions) == 1 and [t.value for t in one.trials] == [0.9, 0.7]
    assert first_objective_study(one, "val_acc", "max") is one


def test_report_front_figure_separates_front_dominated_infeasible_and_marks_the_pick(tmp_path):
    records, front = _records(tmp_path), front_of(_records(tmp_path))
    ranks = {t.trial_id: str(n) for n, t in enumerate(front.members, start=1)}
    runs = [tracking.RunRecord(t.run_id, {}, {}, {"mlflow.runName": f"trial {t.number}", "drcaps.pareto_rank":
                                                  ranks.get(t.trial_id, ""),
                                                  "drcaps.objectives": json.dumps(front.values[t.trial_id])},
                               "FINISHED", "") for t in records.trials if t.trial_id in front.values]
    parent = tracking.RunRecord("parent", {}, {}, {"drcaps.best_run_id": "run-b", "drcaps.pareto.reference":
                                                   json.dumps(front.reference)}, "FINISHED", "")
    sections = front_sections(SearchData(records.experiment, parent, runs, {}, None))
    assert [s.key for s in sections] == ["pareto_front", "hypervolume"]
    traces = {t.name: t for t in sections[0].figure.data}
    assert list(traces["front"].y) == [0.8, 0.9, 0.6]                  # by rank
    assert sorted(traces["dominated"].y) == [0.7] and list(traces["infeasible"].y) == [0.95]
    assert list(traces["pick"].x) == [200.0]
    curve = list(sections[1].figure.data[0].y)                          # trials a, b, c, d, e in number order
    assert curve[-1] == pytest.approx(front.hypervolume) and curve == sorted(curve)
