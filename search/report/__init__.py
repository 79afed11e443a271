"""The report of one search: a self-contained HTML page (plotly.js inline, opens offline) of what the search found.

Figures, in page order (``FIGURES``): the optimisation history, parallel coordinates and hyperparameter importances
(Optuna's own ``optuna.visualization`` over the search's study; when the study cannot be opened, over the same
study rebuilt in memory from the MLflow trial runs), the learning curves of the top trials with stopped ones marked
(MLflow metric histories), the best model's confusion matrix on the test split, and its capsule diagnostics
(``drcapsnet.diagnostics``): coupling entropy per routing iteration, class-capsule lengths of correct and wrong
predictions, inputs beside their reconstructions, and the paper's dimension-perturbation grid. Every chart is
plotly's or Optuna's; this module only gathers the data. MLflow is read through ``search.tracking`` only.

The package: ``data`` (what a report is made of, read back from MLflow), ``study`` (Optuna's plots, learning
curves), ``model`` (the best model's figures); the page itself is written here.
"""

from __future__ import annotations

import html
import os
import time
from collections import Counter
from pathlib import Path

from search import tracking
from search.report.confirmation import confirmation_section
from search.report.data import (
    FIGURES,
    REPORT_ARTIFACT,
    SearchData,
    Section,
    best_value,
    load,
    run_label,
    run_outcome,
    trial_params,
)
from search.report.front import first_objective_study, front_sections
from search.report.model import model_sections
from search.report.study import learning_curves, open_study, study_sections
from search.report.warm import warm_start_section

__all__ = ["FIGURES", "REPORT_ARTIFACT", "SearchData", "Section", "build_sections", "open_study", "render_html",
           "report_search", "write_report"]


def build_sections(uri: str, data: SearchData) -> list[Section]:
    """Every figure of the report, in ``FIGURES`` order."""
    study, source = open_study(data, uri)
    search = data.experiment.search
    study = first_objective_study(study, search.metric, search.mode)   # several objectives: Optuna's plots: the first
    sections = [*study_sections(study, data.experiment.search.metric, source), learning_curves(data),
                *model_sections(data, uri)]
    assert [s.key for s in sections] == list(FIGURES), [s.key for s in sections]
    confirmed = confirmation_section(data, uri)          # only for a search that confirmed its winner
    taken = warm_start_section(data, study, uri)         # only for a warm-started search
    return sections[:4] + front_sections(data) + [s for s in (confirmed, taken) if s is not None] + sections[4:]


def _summary(data: SearchData, uri: str) -> str:
    s = data.experiment.search
    outcomes = Counter(run_outcome(t) for t in data.trials)
    counts = ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in outcomes.most_common())
    best = ""
    if data.best is not None:
        value = best_value(data.histories[data.best.run_id], s.mode)
        shown = "-" if value is None else f"{value:.4f}"
        params = ", ".join(f"{k} = {v}" for k, v in trial_params(data.experiment, data.best).items())
        best = (f"<p>Best trial <b>{html.escape(run_label(data.best))}</b>: {html.escape(s.metric)} = {shown} "
                f"({html.escape(params)}); run <code>{data.best.run_id}</code>.</p>")
    model = data.parent.tags.get("drcaps.model_uri")
    return (f"<p>Experiment <b>{html.escape(data.experiment.mlflow_experiment)}</b>, search "
            f"<b>{html.escape(run_label(data.parent))}</b> (run <code>{data.parent.run_id}</code>, "
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
    data = load(tracking_uri, experiment, parent_run_id)
    sections = build_sections(tracking_uri, data)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    title = f"drcaps search report: {run_label(data.parent)}"
    tmp.write_text(render_html(sections, _summary(data, tracking_uri), title), encoding="utf-8")
    os.replace(tmp, out)
    return out


def report_search(tracking_uri: str, experiment: str, parent_run_id: str, out: Path) -> Path:
    """At the end of a search: write its report to ``out`` and log it to the search's parent run as
    ``report/<out.name>``; returns ``out``."""
    path = write_report(tracking_uri, experiment, out, parent_run_id=parent_run_id)
    tracking.log_run_artifact(tracking_uri, parent_run_id, path, REPORT_ARTIFACT)
    return path
