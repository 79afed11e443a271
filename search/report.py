"""The report of one search: a self-contained HTML page (plotly.js inline, opens offline) of what the search found.

Figures, in page order (``FIGURES``): the optimisation history, parallel coordinates and hyperparameter importances
(Optuna's own ``optuna.visualization`` over the search's study; when the study cannot be opened, over the same
study rebuilt in memory from the MLflow trial runs), the learning curves of the top trials with stopped ones marked
(MLflow metric histories), the best model's confusion matrix on the test split, and its capsule diagnostics
(``drcapsnet.diagnostics``): coupling entropy per routing iteration, class-capsule lengths of correct and wrong
predictions, inputs beside their reconstructions, and the paper's dimension-perturbation grid. Every chart is
plotly's or Optuna's; this module only gathers the data. MLflow is read through ``search.tracking`` only.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import tracking

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go
    import torch

    from drcapsnet.model import CapsNet
    from search.experiment import Experiment

REPORT_ARTIFACT = "report"          # the parent run's artifact folder holding report.html
TOP_CURVES = 10                     # learning curves drawn: the best trials
DIAGNOSTIC_IMAGES = 256             # test images for the coupling entropy (one routing pass per iteration count)
RECONSTRUCTIONS = 10                # inputs shown beside their reconstructions
FIGURES = ("optimization_history", "parallel_coordinates", "param_importances", "learning_curves",
           "confusion_matrix", "coupling_entropy", "capsule_lengths", "reconstructions", "perturbation_grid")


@dataclass(frozen=True)
class Section:
    key: str                        # one of FIGURES
    title: str
    caption: str                    # what the figure shows and how to read it
    figure: go.Figure | None
    note: str = ""                  # why there is no figure, or what it is built from


@dataclass(frozen=True)
class SearchData:
    """What the report needs from MLflow about one search."""

    experiment: Experiment
    parent: tracking.RunRecord
    trials: list[tracking.RunRecord]
    histories: dict[str, list[tuple[int, float]]]      # run id -> [(epoch, metric)]
    best: tracking.RunRecord | None


# ---------------------------------------------------------------- gathering

def _load(uri: str, experiment: str, parent_run_id: str | None) -> SearchData:
    from search.experiment import experiment_from_dict

    if parent_run_id is None:
        latest = tracking.latest_search_run(uri, experiment)      # smoke tests do not count
        if latest is None:
            raise tracking.TrackingError(f"EXPERIMENT: no search of {experiment!r} at {uri}; run 'drcaps search' "
                                         "first, or pass the --tracking-uri the search used")
        parent = latest
    else:
        parent = tracking.get_run(uri, parent_run_id)
    raw = json.loads(tracking.read_text_artifact(uri, parent.run_id, "resolved_experiment.json"))
    exp = experiment_from_dict(raw, source=f"run {parent.run_id}")
    trials = tracking.child_runs(uri, parent.run_id)
    histories = {t.run_id: tracking.metric_history(uri, t.run_id, exp.search.metric) for t in trials}
    best_id = parent.tags.get("drcaps.best_run_id")
    best = next((t for t in trials if t.run_id == best_id), None)
    if best is None:
        sign = 1.0 if exp.search.mode == "max" else -1.0
        scored = [t for t in trials if t.status != "FAILED" and histories[t.run_id]]
        best = max(scored, key=lambda t: max(sign * v for _, v in histories[t.run_id]), default=None)
    return SearchData(exp, parent, trials, histories, best)


def _params(exp: Experiment, run: tracking.RunRecord) -> dict[str, Any]:
    """The searched params of a trial run, typed back from MLflow's strings."""
    from search.experiment import parse_override

    return {k: parse_override(f"{k}={run.params[k]}")[1] for k in exp.search.space if k in run.params}


def _label(run: tracking.RunRecord) -> str:
    return run.tags.get("mlflow.runName") or run.tags.get("drcaps.trial_id") or run.run_id[:8]


def _outcome(run: tracking.RunRecord) -> str:
    return run.tags.get("drcaps.outcome") or {"FINISHED": "finished", "KILLED": "stopped_early"}.get(
        run.status, "failed")


# ---------------------------------------------------------------- the study

def open_study(data: SearchData, uri: str) -> tuple[optuna.Study, str]:
    """The search's Optuna study from its storage (``drcaps.study_name`` on the parent run), else the same study
    rebuilt in memory from the MLflow trial runs. Returns the study and where it came from."""
    import optuna

    from search.tune import optuna_storage_url

    name = data.parent.tags.get("drcaps.study_name", "")
    storage = data.parent.tags.get("drcaps.optuna_storage") or optuna_storage_url(data.experiment, uri)
    reason = f"no study {name!r} in {storage}"
    db = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else None
    if name and (db is None or Path(db).exists()):     # RDBStorage would create an empty SQLite file
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            if study.trials:
                return study, f"Optuna study {name!r} in {storage}"
        except (KeyError, ValueError, ImportError, RuntimeError) as e:
            reason = f"cannot open study {name!r} in {storage}: {e}"
        except Exception as e:                             # sqlalchemy errors: a missing table, a server down
            reason = f"cannot open study {name!r} in {storage}: {type(e).__name__}: {e}"
    return _study_from_mlflow(data), f"rebuilt from the MLflow trial runs ({reason})"


def _study_from_mlflow(data: SearchData) -> optuna.Study:
    import optuna

    from search.space import to_distributions

    s = data.experiment.search
    states = {"finished": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
    study = optuna.create_study(direction="maximize" if s.mode == "max" else "minimize")
    study.set_metric_names([s.metric])
    distributions = to_distributions(s.space)
    for run in data.trials:
        history = data.histories[run.run_id]
        state = states.get(_outcome(run), optuna.trial.TrialState.FAIL) if history else optuna.trial.TrialState.FAIL
        best = (max if s.mode == "max" else min)((v for _, v in history), default=None)
        params = _params(data.experiment, run)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=best if state == optuna.trial.TrialState.COMPLETE else None, state=state,
            intermediate_values=dict(history), user_attrs={"mlflow_run_id": run.run_id}))
    return study


def _counting_stopped_trials(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` in which each trial stopped early (PRUNED) counts as completed with its best
    intermediate value: what parallel coordinates and importances can use when fewer than 2 trials completed."""
    import optuna

    done, stopped = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    copy = optuna.create_study(direction=study.direction)
    for t in study.trials:
        if t.state == done:
            copy.add_trial(t)
        elif t.state == stopped and t.intermediate_values:
            copy.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=best(t.intermediate_values.values()),
                intermediate_values=t.intermediate_values, user_attrs=t.user_attrs))
    return copy


def _study_sections(study: optuna.Study, metric: str, source: str) -> list[Section]:
    import optuna
    from optuna import visualization as ov

    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    scored, scored_note = study, ""
    if completed < 2:
        scored = _counting_stopped_trials(study)
        scored_note = (f" Only {completed} trial ran every epoch, so the trials stopped early are counted here "
                       f"with their best {metric}.")

    def made(key: str, title: str, caption: str, plot: Callable[[], go.Figure], note: str = "") -> Section:
        try:
            return Section(key, title, caption, plot(), f"From the {source}.{note}")
        except (ValueError, RuntimeError) as e:            # e.g. importances need two scored trials
            return Section(key, title, caption, None, f"Not drawn: {e}")

    return [
        made("optimization_history", "Optimisation history",
             f"Each trial's {metric} in the order Optuna proposed it, and the best so far: does the sampler improve "
             "on its first proposals?", lambda: ov.plot_optimization_history(study, target_name=metric)),
        made("parallel_coordinates", "Parallel coordinates",
             f"One line per completed trial through its searched values, coloured by {metric}: which regions of the "
             "space the good trials share.", lambda: ov.plot_parallel_coordinate(scored, target_name=metric),
             scored_note),
        made("param_importances", "Hyperparameter importance",
             f"How much of the variation in {metric} over the completed trials each searched parameter explains "
             "(Optuna's default importance evaluator).",
             lambda: ov.plot_param_importances(scored, target_name=metric), scored_note),
    ]


# ---------------------------------------------------------------- learning curves

def _learning_curves(data: SearchData) -> Section:
    import pandas as pd
    import plotly.express as px

    s = data.experiment.search
    sign = 1.0 if s.mode == "max" else -1.0
    ranked = sorted((t for t in data.trials if data.histories[t.run_id]),
                    key=lambda t: -max(sign * v for _, v in data.histories[t.run_id]))[:TOP_CURVES]
    rows = [{"epoch": step, s.metric: value, "trial": _label(t), "outcome": _outcome(t)}
            for t in ranked for step, value in data.histories[t.run_id]]
    caption = (f"{s.metric} per epoch of the {len(ranked)} best trials (MLflow metric histories). Dashed lines with "
               "crosses are trials that did not run every epoch (stopped early by the scheduler, or failed); solid "
               "ones ran every epoch.")
    if not rows:
        return Section("learning_curves", "Learning curves of the top trials", caption, None,
                       "Not drawn: no trial logged the metric.")
    df = pd.DataFrame(rows)
    # finished: solid with dots; any other outcome (stopped early, interrupted, failed): dashed with crosses
    fig = px.line(df, x="epoch", y=s.metric, color="trial", line_dash="outcome", symbol="outcome", markers=True,
                  line_dash_map={"finished": "solid"}, line_dash_sequence=["dash", "dot", "dashdot"],
                  symbol_map={"finished": "circle"}, symbol_sequence=["x", "cross", "diamond"])
    fig.update_xaxes(dtick=1)
    return Section("learning_curves", "Learning curves of the top trials", caption, fig)


# ---------------------------------------------------------------- the best model

def _best_model(data: SearchData, uri: str, tmp: Path) -> tuple[CapsNet, Any]:
    """The best model (the registered ``@best`` version, else the best run's checkpoint) and its RunConfig."""
    from drcapsnet.checkpoint import load_model
    from search.space import apply_params

    assert data.best is not None
    run = apply_params(data.experiment, _params(data.experiment, data.best))
    model_uri = data.parent.tags.get("drcaps.model_uri")
    if model_uri:
        return tracking.load_model(uri, model_uri).capsnet.eval(), run
    folder = tracking.download_artifacts(uri, data.best.run_id, "checkpoint", tmp)
    capsnet, _, _ = load_model(next(Path(folder).glob("*.pt")))
    return capsnet, run


def _images(grid: torch.Tensor, rows: int) -> Any:
    """A (rows*cols, C, H, W) batch in [0, 1] tiled into one (H', W'[, 3]) uint8 picture (torchvision's make_grid)."""
    from torchvision.utils import make_grid

    tiled = make_grid(grid.clamp(0, 1), nrow=len(grid) // rows, padding=2, pad_value=1.0)   # (3, H', W')
    if grid.shape[1] == 1:
        return (tiled[0] * 255).round().byte().numpy()                                       # (H', W')
    return (tiled.permute(1, 2, 0) * 255).round().byte().numpy()                              # (H', W', 3)


def _model_sections(data: SearchData, uri: str) -> list[Section]:
    import tempfile

    import pandas as pd
    import plotly.express as px
    import torch
    from sklearn.metrics import confusion_matrix

    from drcapsnet import diagnostics
    from drcapsnet.checkpoint import CheckpointError
    from drcapsnet.data import DataError, iterate_batches, load_datasets

    titles = {"confusion_matrix": "Confusion matrix of the best model (test split)",
              "coupling_entropy": "Routing: coupling entropy per iteration",
              "capsule_lengths": "Class-capsule lengths, correct vs wrong predictions",
              "reconstructions": "Inputs and their reconstructions",
              "perturbation_grid": "Dimension perturbations of the predicted capsule"}
    captions = {
        "confusion_matrix": "Rows: true class; columns: the class of the longest capsule; counts over the whole "
                            "test split. Off-diagonal cells are the mistakes.",
        "coupling_entropy": "Entropy (nats) of each primary capsule's coupling over the class capsules, averaged "
                            "per test image, at each routing iteration. Iteration 1 is uniform coupling (log K, "
                            "the dashed line); if routing sharpens, later iterations are lower.",
        "capsule_lengths": "Length of the predicted (longest) class capsule, the network's confidence, over the "
                           "test split, for correct and for wrong predictions (percent of each group).",
        "reconstructions": "Top row: test images; bottom row: the decoder's image of each from its predicted "
                           "capsule (the other class capsules masked to zero).",
        "perturbation_grid": "The predicted capsule of one test image decoded with one dimension moved by -0.25 .. "
                             "0.25 in steps of 0.05 (Sabour et al. 2017, figure 4): a row per dimension, the "
                             "middle column unmoved. A dimension that changes the stroke encodes a property of it.",
    }

    def missing(reason: str) -> list[Section]:
        return [Section(k, titles[k], captions[k], None, f"Not drawn: {reason}") for k in titles]

    if data.best is None:
        return missing("no trial logged the metric")
    try:
        with tempfile.TemporaryDirectory(prefix="drcaps-report-") as tmp:
            model, run = _best_model(data, uri, Path(tmp))
        test = load_datasets(run.data).test
    except (tracking.TrackingError, CheckpointError, DataError, StopIteration, OSError) as e:
        return missing(f"cannot load the best model or its test split ({type(e).__name__}: {e})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    best = f"Best trial: {_label(data.best)} (run {data.best.run_id})."

    lengths, labels, images = [], [], []
    for x, y in iterate_batches(test, 256, shuffle=False, device=device):
        lengths.append(diagnostics.capsule_lengths(model, x).cpu())
        labels.append(y.cpu())
        if sum(len(i) for i in images) < DIAGNOSTIC_IMAGES:
            images.append(x)
    lengths_all, y_all = torch.cat(lengths), torch.cat(labels)                  # (N, K), (N,)
    x_diag = torch.cat(images)[:DIAGNOSTIC_IMAGES]                               # (B, C, H, W) on device
    pred = lengths_all.argmax(dim=1)
    k = model.cfg.num_classes
    accuracy = float((pred == y_all).float().mean())

    cm = confusion_matrix(y_all.numpy(), pred.numpy(), labels=list(range(k)))
    fig_cm = px.imshow(cm, text_auto=True, color_continuous_scale="Blues", x=[str(i) for i in range(k)],
                       y=[str(i) for i in range(k)], labels={"x": "predicted", "y": "true", "color": "images"})
    sections = [Section("confusion_matrix", titles["confusion_matrix"], captions["confusion_matrix"], fig_cm,
                        f"{best} Test accuracy {100 * accuracy:.2f}% over {len(y_all)} images.")]

    entropy = diagnostics.coupling_entropy_per_iteration(model, x_diag).cpu()   # (T, B)
    df_h = pd.DataFrame({"iteration": [t + 1 for t in range(len(entropy)) for _ in range(entropy.shape[1])],
                         "entropy (nats)": entropy.flatten().numpy()})
    fig_h = px.box(df_h, x="iteration", y="entropy (nats)", points=False, range_y=[0, 1.1 * math.log(k)])
    fig_h.add_hline(y=math.log(k), line_dash="dot", line_color="gray", opacity=0.6,
                    annotation_text="log K: uniform", annotation_position="top left")
    fig_h.update_xaxes(dtick=1)
    means = ", ".join(f"{float(m):.3f}" for m in entropy.mean(dim=1))
    single = " (one iteration: uniform coupling, nothing to sharpen)" if len(entropy) == 1 else ""
    sections.append(Section("coupling_entropy", titles["coupling_entropy"], captions["coupling_entropy"], fig_h,
                            f"{model.cfg.routing} routing, {model.cfg.routing_iterations} iterations{single}, "
                            f"{entropy.shape[1]} test images; mean entropy per iteration: {means}."))

    top = lengths_all.max(dim=1).values
    df_l = pd.DataFrame({"length of the predicted capsule": top.numpy(),
                         "prediction": ["correct" if c else "wrong" for c in (pred == y_all).tolist()]})
    fig_l = px.histogram(df_l, x="length of the predicted capsule", color="prediction", barmode="overlay",
                         histnorm="percent", nbins=40, range_x=[0, 1],
                         color_discrete_map={"correct": "#2ca02c", "wrong": "#d62728"})
    wrong = int((pred != y_all).sum())
    sections.append(Section("capsule_lengths", titles["capsule_lengths"], captions["capsule_lengths"], fig_l,
                            f"{len(y_all) - wrong} correct, {wrong} wrong predictions."))

    if model.decoder is None:
        return sections + missing("the best model has no decoder (model.decoder: false)")[-2:]
    x_rec = x_diag[:RECONSTRUCTIONS]
    rec = diagnostics.reconstructions(model, x_rec)
    fig_r = px.imshow(_images(torch.cat([x_rec, rec]).cpu(), rows=2), binary_string=True)
    sections.append(Section("reconstructions", titles["reconstructions"], captions["reconstructions"],
                            _plain_image(fig_r)))

    correct = (pred[: len(x_diag)] == y_all[: len(x_diag)]).nonzero()
    i = int(correct[0]) if len(correct) else 0
    grid = diagnostics.perturbation_grid(model, x_diag[i: i + 1])[0].cpu()     # (D, S, C, H, W)
    d, s = grid.shape[:2]
    fig_p = _plain_image(px.imshow(_images(grid.flatten(0, 1), rows=d), binary_string=True))
    size = grid.shape[-1] + 2                                                    # tile + make_grid's padding
    deltas = [f"{float(v):+.2f}" for v in diagnostics.PERTURBATIONS]
    fig_p.update_xaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(s)], ticktext=deltas,
                       title_text="change of the dimension")
    fig_p.update_yaxes(visible=True, tickvals=[2 + size * j + size / 2 - 1 for j in range(d)],
                       ticktext=[str(j) for j in range(d)], title_text="capsule dimension")
    fig_p.update_layout(height=max(400, 40 * d + 120), width=max(500, 40 * s + 160))
    sections.append(Section("perturbation_grid", titles["perturbation_grid"], captions["perturbation_grid"], fig_p,
                            f"Test image {i} (true class {int(y_all[i])}, predicted {int(pred[i])}); "
                            f"{d} dimensions x {s} steps."))
    return sections


def _plain_image(fig: go.Figure) -> go.Figure:
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


# ---------------------------------------------------------------- the page

def build_sections(uri: str, data: SearchData) -> list[Section]:
    """Every figure of the report, in ``FIGURES`` order."""
    study, source = open_study(data, uri)
    sections = [*_study_sections(study, data.experiment.search.metric, source), _learning_curves(data),
                *_model_sections(data, uri)]
    assert [s.key for s in sections] == list(FIGURES), [s.key for s in sections]
    return sections


def _summary(data: SearchData, uri: str) -> str:
    s = data.experiment.search
    outcomes = Counter(_outcome(t) for t in data.trials)
    counts = ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in outcomes.most_common())
    best = ""
    if data.best is not None:
        sign = 1.0 if s.mode == "max" else -1.0
        value = max((sign * v for _, v in data.histories[data.best.run_id]), default=math.nan) * sign
        params = ", ".join(f"{k} = {v}" for k, v in _params(data.experiment, data.best).items())
        best = (f"<p>Best trial <b>{html.escape(_label(data.best))}</b>: {html.escape(s.metric)} = {value:.4f} "
                f"({html.escape(params)}); run <code>{data.best.run_id}</code>.</p>")
    model = data.parent.tags.get("drcaps.model_uri")
    return (f"<p>Experiment <b>{html.escape(data.experiment.mlflow_experiment)}</b>, search "
            f"<b>{html.escape(_label(data.parent))}</b> (run <code>{data.parent.run_id}</code>, "
            f"{html.escape(data.parent.status)}) in <code>{html.escape(uri)}</code>: {len(data.trials)} trials "
            f"({counts}); {html.escape(s.sampler)} sampler, {html.escape(s.scheduler.name)} scheduler, "
            f"{html.escape(s.mode)}imise {html.escape(s.metric)}.</p>{best}"
            + (f"<p>Registered model: <code>{html.escape(model)}</code></p>" if model else ""))


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
section{margin:2.5em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}p.note{color:#666;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}nav a{margin-right:1em}"""


def render_html(sections: list[Section], summary: str, title: str) -> str:
    """One HTML page: plotly.js inline, each figure's JSON in a ``<script type="application/json"
    class="drcaps-figure" data-key=KEY>`` drawn by ``Plotly.newPlot`` (so tests read exactly what is drawn)."""
    from plotly.offline import get_plotlyjs

    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        parts = [f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2><p>{html.escape(s.caption)}</p>']
        if s.figure is not None:
            figure_json = s.figure.to_json().replace("</", "<\\/")     # no "</script>" inside the script
            parts.append(f'<div class="figure" id="fig-{s.key}"></div><script type="application/json" '
                         f'class="drcaps-figure" data-key="{s.key}">{figure_json}</script>')
        if s.note:
            parts.append(f'<p class="note">{html.escape(s.note)}</p>')
        body.append("".join(parts) + "</section>")
    draw = ("document.querySelectorAll('script.drcaps-figure').forEach(function(el){var f=JSON.parse(el.textContent);"
            "Plotly.newPlot('fig-'+el.dataset.key,f.data,f.layout,{responsive:true,displaylogo:false});});")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body><h1>{html.escape(title)}</h1>"
            f"{summary}<nav>{nav}</nav>{''.join(body)}<script>{draw}</script>"
            f"<p class=\"note\">Written by drcaps report on {time.strftime('%Y-%m-%d %H:%M:%S')}.</p></body></html>")


def write_report(tracking_uri: str, experiment: str, out: Path, *, parent_run_id: str | None = None) -> Path:
    """Write the report of the latest (non-smoke) search of MLflow experiment ``experiment`` (or of the search
    ``parent_run_id``) to ``out``; returns its absolute path."""
    data = _load(tracking_uri, experiment, parent_run_id)
    sections = build_sections(tracking_uri, data)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(render_html(sections, _summary(data, tracking_uri), f"drcaps search report: {_label(data.parent)}"),
                   encoding="utf-8")
    os.replace(tmp, out)
    return out


def report_search(tracking_uri: str, experiment: str, parent_run_id: str, out: Path) -> Path:
    """At the end of a search: write its report to ``out`` and log it to the search's parent run as
    ``report/<out.name>``; returns ``out``."""
    path = write_report(tracking_uri, experiment, out, parent_run_id=parent_run_id)
    tracking.log_run_artifact(tracking_uri, parent_run_id, path, REPORT_ARTIFACT)
    return path
