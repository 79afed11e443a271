"""search.objectives / search.constraints / search.pick: each bad input is one line naming the dotted field and the fix,
exit code 2 from ``drcaps validate``, every problem of a file at once; good inputs load as the lead will use them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import main
from search.experiment import experiment_from_dict, experiment_to_dict, load_experiment

ROOT = Path(__file__).parents[2]
PARETO = ROOT / "experiments" / "quickstart-pareto.yaml"
LATENCY = "    - {metric: latency_ms, mode: min}\n"


def variant(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = PARETO.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def validate_errors(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``drcaps validate`` must exit 2; the problem lines it printed (after the ``error: FILE:`` header)."""
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:") and "Traceback" not in err, err
    lines = err.splitlines()
    return [lines[0].removeprefix(f"error: {path}: ")] if len(lines) == 1 else [line.strip() for line in lines[1:]]


@pytest.mark.parametrize("replacement, line", [
    ((LATENCY, "    - {metric: latncy_ms, mode: min}\n"),
     "search.objectives[1].metric: unknown metric 'latncy_ms' (did you mean 'latency_ms'?); a trial offers val_acc, "
     "val_loss, train_acc, train_loss, params, flops, latency_ms, train_s_per_epoch"),
    ((LATENCY, "    - {metric: latency_ms, mode: minimize}\n"),
     "search.objectives[1].mode: must be max or min, got 'minimize'"),
    (("    params: {max: 1.5e+6}", "    test_acc: {min: 0.9}"),
     "search.constraints.test_acc: 'test_acc' is not a metric a trial produces; use one of val_acc, val_loss, "
     "train_acc, train_loss, params, flops, latency_ms, train_s_per_epoch"),
    (("  sampler: tpe ", "  sampler: cmaes "),
     "search.sampler: 'cmaes' cannot search several objectives; use one of tpe, nsga2, gp, random"),
    (("  pick: knee ", "  pick: {maximize: params} "),
     "search.pick.maximize: 'params' is not an objective; use one of val_acc, latency_ms"),
], ids=["unknown-metric", "bad-mode", "constraint-not-produced", "single-objective-sampler", "pick-outside"])
def test_each_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               replacement: tuple[str, str], line: str) -> None:
    assert validate_errors(variant(tmp_path, replacement), capsys) == [line]


def test_every_problem_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = variant(tmp_path,
                   (LATENCY, "    - {metric: latency_ms, mode: minimize, weight: 2}\n    - {metric: val_acc}\n"),
                   ("    params: {max: 1.5e+6}", "    params: {max: 1.0e+6, min: 2.0e+6}\n    flops: {below: 3}"),
                   ("  pick: knee ", "  pick: {maximize: val_acc, subject_to: {flops: {max: fast}}} "),
                   ("  sampler: tpe ", "  sampler: qmc "),
                   ("{name: asha,", "{name: median,"))
    found = validate_errors(path, capsys)
    assert found == [
        "search.objectives[1].weight: unknown key",
        "search.objectives[1].mode: must be max or min, got 'minimize'",
        "search.objectives[2].metric: 'val_acc' is already an objective; list it once",
        "search.objectives[2].mode: required, max or min",
        "search.sampler: 'qmc' cannot search several objectives; use one of tpe, nsga2, gp, random",
        "search.scheduler.name: 'median' stops trials on one metric; with several objectives use asha (MO-ASHA) or "
        "none",
        "search.constraints.params: min 2000000.0 is above max 1000000.0: no trial can meet it; swap them",
        "search.constraints.flops: expected {max: V} or {min: V} (or both), got {'below': 3}",
        "search.pick.subject_to.flops: 'flops' is not an objective; use one of val_acc, latency_ms",
        "search.pick.subject_to.flops.max: must be a finite number, got 'fast'",
    ], found


def test_metric_and_mode_are_the_first_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = load_experiment(variant(tmp_path, ("  objectives:\n    - {metric: val_acc, mode: max}\n" + LATENCY,
                                             "  objectives:\n" + LATENCY + "    - {metric: val_acc, mode: max}\n")))
    assert (exp.search.metric, exp.search.mode) == ("latency_ms", "min")
    assert exp.search.objective_pairs == (("latency_ms", "min"), ("val_acc", "max"))
    assert exp.search.multi_objective and exp.search.measured_costs == ("params", "latency_ms")
    assert experiment_from_dict(experiment_to_dict(exp)) == exp                      # a dump loads back equal

    contradicting = variant(tmp_path, ("search:\n", "search:\n  metric: val_loss\n  mode: min\n"))
    assert validate_errors(contradicting, capsys) == [
        "search.metric: is the first objective's metric ('val_acc') when search.objectives is given, got "
        "'val_loss'; leave search.metric out",
        "search.mode: is the first objective's mode ('max') when search.objectives is given, got 'min'; leave "
        "search.mode out"]
    agreeing = variant(tmp_path, ("search:\n", "search:\n  metric: val_acc\n  mode: max\n"))
    assert load_experiment(agreeing).search.objective_pairs == exp.search.objective_pairs[::-1]


def test_pick_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_errors(variant(tmp_path, ("  pick: knee ", "  pick: kne ")), capsys) == [
        "search.pick: must be knee or {maximize|minimize: METRIC, subject_to: {METRIC: {max: V}}}, got 'kne'"]
    both = variant(tmp_path, ("  pick: knee ", "  pick: {maximize: val_acc, minimize: latency_ms, subjet_to: {}} "))
    assert validate_errors(both, capsys) == [
        "search.pick.subjet_to: unknown key (did you mean 'subject_to'?)",
        "search.pick: needs exactly one of maximize, minimize, got {'maximize': 'val_acc', 'minimize': "
        "'latency_ms', 'subjet_to': {}}; write knee or {maximize|minimize: METRIC, subject_to: {METRIC: {max: V}}}"]
    rule = "  pick: {minimize: latency_ms, subject_to: {val_acc: {min: 0.95}}} "
    assert load_experiment(variant(tmp_path, ("  pick: knee ", rule))).search.pick == {
        "minimize": "latency_ms", "subject_to": {"val_acc": {"min": 0.95}}}


def test_single_objective_files_are_unchanged_and_may_use_constraints_and_nsga2(tmp_path: Path) -> None:
    quick = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    assert quick.search.objectives == () and quick.search.objective_pairs == (("val_acc", "max"),)
    assert not quick.search.multi_objective and quick.search.pick == "knee" and quick.search.constraints == {}
    constrained = load_experiment(ROOT / "experiments" / "quickstart.yaml",
                                  ["search.sampler=nsga2", "search.constraints.latency_ms.max=5.0",
                                   "search.scheduler.name=median"])
    assert constrained.search.constraints == {"latency_ms": {"max": 5.0}}
    assert constrained.search.measured_costs == ("latency_ms",)


def test_the_console_script_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = variant(tmp_path, (LATENCY, "    - {metric: latency, mode: min}\n"))
    done = subprocess.run([str(Path(sys.executable).parent / "drcaps"), "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"error: {bad}: search.objectives[1].metric: unknown metric 'latency' (did you mean 'latency_ms'?); a trial "
        "offers val_acc, val_loss, train_acc, train_loss, params, flops, latency_ms, train_s_per_epoch\n")
