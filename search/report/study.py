"""The search-wide figures: Optuna's own plots (optimisation history, parallel coordinates, importances) over the
search's study, opened from its storage or rebuilt from the MLflow runs, and the learning curves of the best trials
with stopped ones marked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from search import ranking
from search.report.data import TOP_CURVES, SearchData, Section, best_value, run_label, run_outcome, trial_params

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

STORAGE_TAG = "drcaps.optuna_storage"      # on the parent run: the study's storage URL, any password masked as ***


def open_study(data: SearchData, uri: str) -> tuple[optuna.Study, str]:
    """The search's Optuna study from its storage (``drcaps.study_name`` on the parent run), else the same study
    rebuilt in memory from the MLflow trial runs. Returns the study and where it came from."""
    import optuna

    from search.stores import masked

    name = data.parent.tags.get("drcaps.study_name", "")
    storage = storage_url(data, uri)
    shown = masked(storage)                            # the report and the terminal never show a password
    reason = f"no study {name!r} in {shown}"
    db = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else None
    if name and (db is None or Path(db).exists()):     # RDBStorage would create an empty SQLite file
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            if study.trials:
                return study, f"Optuna study {name!r} in {shown}"
        except (KeyError, ValueError, ImportError, RuntimeError) as e:
            reason = f"cannot open study {name!r} in {shown}: {e}"
        except Exception as e:                             # sqlalchemy errors: a missing table, a server down
            reason = f"cannot open study {name!r} in {shown}: {type(e).__name__}"
    return study_from_mlflow(data), f"rebuilt from the MLflow trial runs ({reason.replace(storage, shown)})"


def storage_url(data: SearchData, uri: str) -> str:
    """The search's Optuna storage: the ``drcaps.optuna_storage`` tag of its parent run when it holds a usable URL
    (a password in it is masked as ``***``), else derived from the search's resolved experiment as the search
    derived it (``search.storage``, ``$DRCAPS_OPTUNA_STORAGE``, SQLite beside a local MLflow store)."""
    from search.storage import optuna_storage_url

    tagged = data.parent.tags.get(STORAGE_TAG, "")
    return tagged if tagged and "***" not in tagged else optuna_storage_url(data.experiment, uri)


def _in_memory_study(direction: str | optuna.study.StudyDirection) -> optuna.Study:
    """``optuna.create_study`` without its "A new study created in memory" log line, the logger's level put back."""
    import logging

    import optuna

    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        logger.setLevel(level)


def study_from_mlflow(data: SearchData) -> optuna.Study:
    import optuna

    from search.space import to_distributions

    s = data.experiment.search
    states = {"finished": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
    study = _in_memory_study("maximize" if s.mode == "max" else "minimize")
    study.set_metric_names([s.metric])
    distributions = to_distributions(s.space)
    for run in data.trials:
        history = data.histories[run.run_id]
        best = best_value(history, s.mode)
        state = states.get(run_outcome(run), optuna.trial.TrialState.FAIL) if best is not None else \
            optuna.trial.TrialState.FAIL
        params = trial_params(data.experiment, run)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=best if state == optuna.trial.TrialState.COMPLETE else None, state=state,
            intermediate_values=dict(history), user_attrs={"mlflow_run_id": run.run_id}))
    return study


def counting_stopped_trials(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` in which each trial stopped early (PRUNED) counts as completed with its best
    intermediate value: what parallel coordinates and importances can use when fewer than 2 trials completed."""
    import optuna

    done, stopped = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    mode = "max" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "min"
    copy = _in_memory_study(study.direction)
    for t in study.trials:
        value = best_value(list(t.intermediate_values.items()), mode) if t.state == stopped else None
        if t.state == done:
            copy.add_trial(t)
        elif value is not None:
            copy.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=value,
                intermediate_values=t.intermediate_values, user_attrs=t.user_attrs))
    return copy


def study_sections(study: optuna.Study, metric: str, source: str) -> list[Section]:
    import optuna
    from optuna import visualization as ov

    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    scored, scored_note = study, ""
    if completed < 2:
        scored = counting_stopped_trials(study)
        scored_note = (f" Only {completed} trial ran every epoch, so the trials stopped early are counted here "
                       f"with their best {metric}.")

    def made(key: str, title: str, caption: str, plot: Callable[[], go.Figure], note: str = "") -> Section:
        import warnings

        try:
            with warnings.catch_warnings(record=True) as said:    # e.g. "too few trials to compute importances"
                warnings.simplefilter("always", UserWarning)
                figure = plot()
        except (ValueError, RuntimeError) as e:            # e.g. importances need two scored trials
            return Section(key, title, caption, None, f"Not drawn: {e}")
        told = "".join(f" Optuna: {w.message}" for w in said if issubclass(w.category, UserWarning))
        return Section(key, title, caption, figure, f"From the {source}.{note}{told}")

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


def learning_curves(data: SearchData) -> Section:
    import pandas as pd
    import plotly.express as px

    s = data.experiment.search
    scored = [t for t in data.trials if best_value(data.histories[t.run_id], s.mode) is not None]
    ranked = ranking.rank(scored, lambda t: best_value(data.histories[t.run_id], s.mode), s.mode)[:TOP_CURVES]
    rows = [{"epoch": step, s.metric: value, "trial": run_label(t), "outcome": run_outcome(t)}
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
