"""search.report end to end: the session's real small search (tests/conftest.py: local Ray, Optuna in SQLite, MLflow
in SQLite), then its report, read back from the HTML file exactly as the page draws it (each figure's JSON, images
decoded)."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from search import tracking
from search.cli import main
from search.experiment import experiment_from_dict
from search.publish import SearchResult
from search.report import FIGURES, REPORT_ARTIFACT, report_search
from tests.conftest import E2E_EPOCHS, E2E_SPACE

TILE = 28 + 2                       # an MNIST-sized image and make_grid's padding


class _Figures(HTMLParser):
    """The ``<script type="application/json" class="drcaps-figure" data-key=...>`` blocks of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, Any]] = {}
        self.sections: list[str] = []
        self._key: str | None = None
        self.external_scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("class") == "drcaps-figure":
            self._key = a["data-key"]
        if tag == "script" and a.get("src"):
            self.external_scripts.append(a["src"] or "")
        if tag == "section":
            self.sections.append(a["id"] or "")

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.figures[self._key] = json.loads(data)
            self._key = None


def _values(array: Any) -> list[float]:
    """A plotly JSON array: a list, or numpy's typed-array form ``{"dtype": "f8", "bdata": base64}``."""
    import numpy as np

    if isinstance(array, dict) and "bdata" in array:
        flat = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        return flat.astype(float).tolist()
    return list(np.asarray(array, dtype=object).ravel())


def _points(trace: dict[str, Any]) -> int:
    """How many data points a trace draws (its x/y/z arrays, or an image's pixels)."""
    if trace.get("type") == "image":
        return _image(trace).width * _image(trace).height
    return max(len(_values(trace.get(axis, []))) for axis in ("x", "y", "z"))


def _image(trace: dict[str, Any]) -> Any:
    from PIL import Image

    header, data = trace["source"].split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def report(searched: tuple[SearchResult, Path]) -> tuple[_Figures, str, Path]:
    """``drcaps report e2e`` through the CLI, read back."""
    result, tmp = searched
    out = tmp / "report.html"
    assert main(["report", result.experiment.mlflow_experiment, "--tracking-uri", result.tracking_uri,
                 "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    parsed = _Figures()
    parsed.feed(text)
    return parsed, text, out


@pytest.mark.slow
def test_report_holds_every_figure_each_with_points(report):
    parsed, text, _ = report
    assert parsed.sections == list(FIGURES)
    assert set(parsed.figures) == set(FIGURES), f"missing: {set(FIGURES) - set(parsed.figures)}"
    for key, figure in parsed.figures.items():
        assert figure["data"], f"{key}: no traces"
        assert sum(_points(t) for t in figure["data"]) > 0, f"{key}: no points"
    assert "Not drawn" not in text


@pytest.mark.slow
def test_report_works_offline(report):
    parsed, text, _ = report
    assert parsed.external_scripts == []                    # no CDN: plotly.js is inline
    assert "Plotly.newPlot" in text and len(text) > 3_000_000


@pytest.mark.slow
def test_study_figures_cover_every_trial_and_searched_parameter(report, searched):
    import optuna

    parsed, _, _ = report
    result, _ = searched
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    history = parsed.figures["optimization_history"]["data"]
    shown = sorted(float(v) for t in history if t.get("mode") == "markers" for v in _values(t["y"]))
    assert shown == sorted(t.value for t in completed)
    axes = parsed.figures["parallel_coordinates"]["layout"]["xaxis"]["ticktext"]   # Optuna's lines over axes
    assert len(axes) == 1 + len(E2E_SPACE) and "train.lr" in axes and any(a.startswith("model.routing") for a in axes)
    importances = parsed.figures["param_importances"]["data"][0]
    assert sorted(_values(importances["y"])) == sorted(E2E_SPACE)


@pytest.mark.slow
def test_learning_curves_follow_mlflow_and_mark_stopped_trials(report, searched):
    parsed, _, _ = report
    result, _ = searched
    traces = parsed.figures["learning_curves"]["data"]
    runs = tracking.child_runs(result.tracking_uri, result.parent_run_id)
    assert len(traces) == len(runs)                          # 4 trials: all within the top 10
    by_epochs = {}
    for run in runs:
        history = tracking.metric_history(result.tracking_uri, run.run_id, "val_acc")
        by_epochs.setdefault(len(history), []).append([v for _, v in history])
    for trace in traces:
        ys = [float(v) for v in _values(trace["y"])]
        assert ys in by_epochs[len(ys)]                      # the trial's MLflow history, epoch by epoch
        stopped = len(ys) < E2E_EPOCHS
        assert (trace["line"]["dash"] != "solid") == stopped, trace["name"]
        assert (trace["marker"]["symbol"] != "circle") == stopped, trace["name"]


@pytest.mark.slow
def test_model_figures_describe_the_best_model_on_the_test_split(report, searched):
    from drcapsnet.data import load_datasets

    parsed, _, _ = report
    result, _ = searched
    test = load_datasets(result.best_config.data).test
    n_test = len(test)
    cm = parsed.figures["confusion_matrix"]["data"][0]
    counts = _values(cm["z"])                                # 10 x 10, row-major
    assert len(counts) == 100 and sum(counts) == n_test
    rows = [sum(counts[r * 10:(r + 1) * 10]) for r in range(10)]
    assert rows == [int((test.labels == c).sum()) for c in range(10)]          # a row per true class
    lengths = parsed.figures["capsule_lengths"]["data"]
    assert sum(len(_values(t["x"])) for t in lengths) == n_test
    correct = sum(len(_values(t["x"])) for t in lengths if t["name"] == "correct")
    assert sum(counts[i * 11] for i in range(10)) == correct                    # the diagonal: right predictions
    assert {t["name"] for t in lengths} <= {"correct", "wrong"}
    assert all(0 <= v < 1 for t in lengths for v in _values(t["x"]))
    entropy = parsed.figures["coupling_entropy"]["data"][0]
    iterations = {int(v) for v in _values(entropy["x"])}
    assert iterations == set(range(1, result.best_config.model.routing_iterations + 1))
    values = [float(v) for v in _values(entropy["y"])]
    assert all(math.isfinite(v) and -1e-6 <= v <= math.log(10) + 1e-6 for v in values)


@pytest.mark.slow
def test_reconstructions_and_perturbation_grid_are_tiled_images(report, searched):
    import numpy as np

    parsed, _, _ = report
    units = searched[0].best_config.model.units                               # the class capsules' dimensions
    rec = _image(parsed.figures["reconstructions"]["data"][0])
    assert (rec.width, rec.height) == (10 * TILE + 2, 2 * TILE + 2)          # 10 inputs over 10 reconstructions
    grid = _image(parsed.figures["perturbation_grid"]["data"][0])
    assert (grid.width, grid.height) == (11 * TILE + 2, units * TILE + 2)    # a row per dimension x 11 steps
    assert len(np.unique(np.asarray(grid))) > 2                               # decoded strokes, not a blank page


@pytest.mark.slow
def test_report_search_logs_the_report_to_the_parent_run(searched, tmp_path):
    result, _ = searched
    path = report_search(result.tracking_uri, result.experiment.mlflow_experiment, result.parent_run_id,
                         tmp_path / "report.html")
    got = tracking.download_artifacts(result.tracking_uri, result.parent_run_id, f"{REPORT_ARTIFACT}/report.html",
                                      tmp_path / "downloaded")
    assert got.read_bytes() == path.read_bytes()


def test_report_of_a_missing_experiment_is_one_error_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "other")
    capsys.readouterr()                                   # MLflow's "creating tables" lines
    code = main(["report", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "'nope'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_tiled_images_match_torchvisions_make_grid() -> None:
    """The report tiles images itself (importing torchvision costs seconds at the end of a search): same pixels as
    torchvision's make_grid with 2 white pixels of padding, for grey and colour images."""
    import torch
    from torchvision.utils import make_grid

    from search.report.model import tile_images

    for channels in (1, 3):
        grid = torch.rand(12, channels, 7, 5) * 1.2 - 0.1                 # values outside [0, 1] are clamped
        ref = make_grid(grid.clamp(0, 1), nrow=4, padding=2, pad_value=1.0)
        ref = ref[0] if channels == 1 else ref.permute(1, 2, 0)
        assert (tile_images(grid, rows=3) == (ref * 255).round().byte().numpy()).all()


@pytest.mark.slow
def test_model_figures_say_why_they_are_not_drawn(searched) -> None:
    """Without a best trial, every model figure is a section with no figure and a "Not drawn: why" note."""
    import dataclasses

    from search.report import data as report_data
    from search.report.model import model_sections

    result, _ = searched
    loaded = report_data.load(result.tracking_uri, result.experiment.mlflow_experiment, result.parent_run_id)
    sections = model_sections(dataclasses.replace(loaded, best=None), result.tracking_uri)
    assert [s.key for s in sections] == [k for k in FIGURES if k in
                                         ("confusion_matrix", "coupling_entropy", "capsule_lengths",
                                          "reconstructions", "perturbation_grid")]
    assert all(s.figure is None and s.note.startswith("Not drawn: no trial") and s.title and s.caption
               for s in sections)


def test_the_rebuilt_study_and_the_curves_rank_as_search_ranking_does(tmp_path: Path) -> None:
    """Without the Optuna storage the report rebuilds the study from MLflow runs: each trial's value is its best
    finite epoch under the search's mode (here ``min``), NaN epochs never count, and the learning curves come best
    first; a stopped trial counts with its best epoch when fewer than 2 trials completed."""
    import optuna

    from search.report.data import SearchData
    from search.report.study import counting_stopped_trials, learning_curves, study_from_mlflow

    exp = experiment_from_dict({
        "name": "ranked", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"epochs": 3},
        "search": {"metric": "val_loss", "mode": "min", "num_samples": 3,
                   "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True}}},
    }, base_dir=tmp_path)

    def run(run_id: str, outcome: str, lr: float) -> tracking.RunRecord:
        return tracking.RunRecord(run_id, {"train.lr": str(lr)}, {}, {"drcaps.outcome": outcome,
                                                                      "mlflow.runName": run_id}, "FINISHED", "")

    trials = [run("a", "finished", 0.01), run("b", "stopped_early", 0.02), run("c", "finished", 0.03)]
    histories = {"a": [(1, 0.9), (2, 0.5), (3, 0.7)], "b": [(1, 0.2), (2, math.nan)],
                 "c": [(1, math.nan), (2, math.nan), (3, math.nan)]}
    data = SearchData(exp, trials[0], trials, histories, None)
    study = study_from_mlflow(data)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                               optuna.trial.TrialState.FAIL]
    assert study.trials[0].value == 0.5                                  # the best epoch under min, not the last
    counted = counting_stopped_trials(study)
    assert [t.value for t in counted.trials] == [0.5, 0.2]               # b's NaN epoch ignored
    curves = learning_curves(data).figure
    assert [trace.name.split(",")[0] for trace in curves.data] == ["b", "a"]  # best first; c: no finite value


def test_the_study_is_opened_from_the_tagged_storage_and_no_password_is_shown(tmp_path: Path) -> None:
    """The parent run's ``drcaps.optuna_storage`` tag is where the study is, unless its password was masked (***):
    then the storage is derived from the search's experiment, as the search derived it. Neither the report's
    notes nor the reason a study could not be opened show a password."""
    import optuna

    from search.report.data import SearchData
    from search.report.study import open_study

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere' / 'optuna.db'}"
    (tmp_path / "elsewhere").mkdir()
    study = optuna.create_study(study_name="s", storage=elsewhere)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))

    def search_data(tag: str, storage: str | None) -> SearchData:
        exp = experiment_from_dict({
            "name": "stored", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"epochs": 2},
            "search": {"num_samples": 1, "storage": storage,
                       "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True}}},
        }, base_dir=tmp_path)
        parent = tracking.RunRecord("p", {}, {}, {"drcaps.study_name": "s", "drcaps.optuna_storage": tag},
                                    "FINISHED", "")
        return SearchData(exp, parent, [], {}, None)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opened, source = open_study(search_data(elsewhere, None), uri)
    assert [t.value for t in opened.trials] == [0.5] and source == f"Optuna study 's' in {elsewhere}"

    secret = "postgresql://drcaps:s3cret@127.0.0.1:1/optuna"              # nothing listens on port 1
    rebuilt, source = open_study(search_data("postgresql://drcaps:***@127.0.0.1:1/optuna", secret), uri)
    assert rebuilt.trials == [] and source.startswith("rebuilt from the MLflow trial runs (cannot open study 's'")
    assert "127.0.0.1:1/optuna" in source and "s3cret" not in source   # the experiment's URL, password hidden


def test_the_confirmation_figure_orders_configs_as_search_ranking_does(tmp_path: Path) -> None:
    """The confirmed configs come best first by their search value under the search's mode (here ``min``); a
    confirmed trial without a search value comes last. Real MLflow runs in a SQLite store."""
    from mlflow import MlflowClient

    from search.report.confirmation import confirmation_section
    from search.report.data import SearchData

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = experiment_from_dict({
        "name": "confirmed", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"epochs": 2},
        "search": {"metric": "val_loss", "mode": "min", "num_samples": 3,
                   "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True}}},
    }, base_dir=tmp_path)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("confirmed")
    parent = client.create_run(exp_id, run_name="search").info.run_id

    def child(name: str, tags: dict[str, str], values: list[float]) -> str:
        run_id = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent, **tags}).info.run_id
        for step, value in enumerate(values, start=1):
            client.log_metric(run_id, "val_loss", value, step=step)
        return run_id

    searched = {0: [0.9, 0.5], 1: [0.3, 0.4], 2: []}                     # trial 2 logged no value
    trials = [child(f"trial {n} lr=0.01", {"drcaps.role": "trial"}, v) for n, v in searched.items()]
    for n in searched:
        child(f"confirm {n}", {"drcaps.role": "confirm", "drcaps.confirms_trial": str(n)}, [0.6])
    records = tracking.child_runs(uri, parent)
    histories = {r.run_id: tracking.metric_history(uri, r.run_id, "val_loss") for r in records}
    data = SearchData(exp, tracking.get_run(uri, parent), records, histories, None)
    assert sorted(histories) == sorted(trials)
    section = confirmation_section(data, uri)
    assert section is not None
    assert list(section.figure.data[0].x) == ["trial 1", "trial 0", "trial 2"]


def test_optunas_warning_about_too_few_trials_goes_into_the_report_not_the_terminal(tmp_path: Path) -> None:
    import warnings

    import optuna

    from search.report.study import study_sections

    study = optuna.create_study(direction="maximize")
    for lr, units, value in ((0.01, 4, 0.5),):                        # 1 trial: too few for importances
        study.add_trial(optuna.trial.create_trial(params={"train.lr": lr, "model.units": units}, value=value,
                                                  distributions={
            "train.lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
            "model.units": optuna.distributions.CategoricalDistribution([4, 8])}))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        sections = {s.key: s for s in study_sections(study, "val_acc", "Optuna study")}
    assert not [w for w in shown if "importances" in str(w.message)], [str(w.message) for w in shown]
    importances = sections["param_importances"]
    assert importances.figure is not None and "too small to compute importances" in importances.note, importances
