"""``StudySearcher``: a Ray Tune ``Searcher`` over one Optuna study, written on Optuna's public ask/tell and storage
API only. Built by ``search.tune.searcher.make_searcher``; this module imports Ray and Optuna when it loads, so
nothing imports it at module level (``import search.tune`` stays light).

What it tells Optuna, so that Optuna and drcaps tell one story:

- a trial's values = the metrics at the epoch where the first objective was best (search/ranking.py, the one
  ranking); with one objective, its best value at any epoch, not its last;
- each epoch's value: one objective, an Optuna intermediate value (the last epoch included); several objectives
  (Optuna forbids ``report`` there), drcaps' own trial user attrs ``intermediate.<metric>`` (search/storage.py);
- a trial stopped before ``max_epochs`` is PRUNED; one that raised, or whose last report carries a non-finite metric
  or the failure key, is FAIL; the study carries the metric names, each trial its MLflow run id;
- the Optuna trial number travels in the trial's config (``number_key``), so Ray, MLflow and Optuna use one number.

Tune pickles the searcher (in its ``tuner.pkl``, and through ``save``/``restore`` at each experiment checkpoint): the
state holds the storage URL, never an open storage, and the study is opened again on first use. An in-memory study
(no URL) is kept in the state whole. After ``--resume`` a trial the killed driver had told Optuna about is not told
again (``skip_if_finished``); one it had asked for but Ray never saved is handed back by search/tune/studies.py
``reconcile_study`` (WAITING), and the next ``ask()`` takes it again with its params.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search import ranking, storage
from search.tune.objectives_run import COST_ATTR

_log = logging.getLogger(__name__)
RUN_ID_KEY = "mlflow_run_id"      # where run_trial's reports carry the trial's MLflow run id


@dataclass
class _Running:
    """What the driver keeps for one trial while it runs (dropped at its end: driver memory, issue 9)."""

    number: int                       # the Optuna trial number
    storage_id: int                   # the storage's id of that trial (storage.get_trial_id_from_study_id_trial_number)
    step: int = 0                     # the last epoch recorded
    history: list[tuple[int, tuple[float, ...]]] = field(default_factory=list)   # (epoch, one value per objective)
    run_id: str | None = None         # the MLflow run id recorded
    kept: dict[str, float] = field(default_factory=dict)   # the ``keep`` metrics' values recorded
    synced: bool = False              # step and history read back from the study (what an earlier driver recorded)


class StudySearcher(Searcher):
    """Proposes trials from ``study_name`` with ``sampler`` over ``space``, ``enqueue`` first; see the module doc."""

    def __init__(self, space: Mapping[str, optuna.distributions.BaseDistribution], *, metric: str | Sequence[str],
                 mode: str | Sequence[str], sampler: optuna.samplers.BaseSampler, study_name: str,
                 storage_url: str | None, enqueue: Sequence[Mapping[str, Any]] = (), max_epochs: int,
                 number_key: str, failure_key: str, keep: Sequence[str] = ()) -> None:
        metrics = [metric] if isinstance(metric, str) else list(metric)
        modes = [mode] if isinstance(mode, str) else list(mode)
        if len(metrics) != len(modes) or not metrics:
            raise ValueError(f"metric and mode: one mode per metric, got {metrics} and {modes}")
        super().__init__(metric=metric if isinstance(metric, str) else metrics,
                         mode=mode if isinstance(mode, str) else modes)
        self._space = dict(space)
        self._metrics, self._modes = metrics, modes
        self._sampler = sampler
        self._study_name, self._storage_url = study_name, storage_url
        self._memory = optuna.storages.InMemoryStorage() if storage_url is None else None
        self._enqueue = [dict(p) for p in enqueue]
        self._enqueued = False
        self._max_epochs = max_epochs
        self._number_key, self._failure_key = number_key, failure_key
        self._keep = tuple(keep)                   # more metrics kept, latest value, in user attrs cost.<metric>
        self._live: dict[str, _Running] = {}       # Ray trial id -> its Optuna trial, while it runs
        self._study: optuna.Study | None = None
        self._backend: optuna.storages.BaseStorage | None = None
        self._study_id = -1

    # ------------------------------------------------------------------------------------------ the study

    @property
    def study(self) -> optuna.Study:
        """The study, opened (created on first use, the enqueued points added once) when first needed."""
        if self._study is None:
            self._open()
        assert self._study is not None
        return self._study

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        """The study's storage (an ``RDBStorage`` tuned by search/storage.py, or in memory)."""
        if self._backend is None:
            self._open()
        assert self._backend is not None
        return self._backend

    @property
    def running(self) -> dict[str, int]:
        """Ray trial id -> Optuna trial number, for the trials this searcher holds as running."""
        return {trial_id: run.number for trial_id, run in self._live.items()}

    def _open(self) -> None:
        backend = self._memory if self._memory is not None else storage.tuned_optuna_storage(str(self._storage_url))
        directions = ["maximize" if m == "max" else "minimize" for m in self._modes]
        study = optuna.create_study(storage=backend, sampler=self._sampler, study_name=self._study_name,
                                    directions=directions, load_if_exists=True)
        if study.metric_names != self._metrics:
            with warnings.catch_warnings():        # "experimental" since Optuna 3.2; the Dashboard shows the names
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(self._metrics))
        if not self._enqueued and not study.get_trials(deepcopy=False):   # a study that has trials had them
            for point in self._enqueue:
                study.enqueue_trial(point)
        self._enqueued = True
        self._study, self._backend = study, backend
        self._study_id = backend.get_study_id_from_name(self._study_name)

    # ------------------------------------------------------------------------------------------ Tune's calls

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return False                               # the space, metric and mode are fixed at construction

    def suggest(self, trial_id: str) -> dict | None:
        trial = self.study.ask(fixed_distributions=self._space)
        storage_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)
        self._live[trial_id] = _Running(trial.number, storage_id)
        return {**trial.params, self._number_key: trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        run = self._live.get(trial_id)
        if run is not None and not self._record(run, result):
            del self._live[trial_id]               # Optuna had finished it already: nothing more is sent

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        run = self._live.pop(trial_id, None)
        if run is None or (result and not self._record(run, result)):
            return
        state, values = self._outcome(run, result or {}, error)
        try:
            self.study.tell(run.number, values, state=state, skip_if_finished=True)
        except Exception as e:                     # e.g. the study was changed by hand meanwhile
            _log.warning("optuna: could not record trial %s (number %s): %s", trial_id, run.number, e)

    def _record(self, run: _Running, result: Mapping[str, Any]) -> bool:
        """One result of a running trial into the study; False when Optuna had finished the trial already (a
        resumed search re-runs a trial the killed driver had told Optuna about: Optuna's record stands)."""
        step = result.get("epoch", result.get("training_iteration"))
        values = [result.get(m) for m in self._metrics]
        try:
            if not run.synced:
                self._sync(run)
            run_id = result.get(RUN_ID_KEY)
            if isinstance(run_id, str) and run_id != run.run_id:
                self.storage.set_trial_user_attr(run.storage_id, storage.MLFLOW_RUN_ATTR, run_id)
                run.run_id = run_id
            self._keep_values(run, result)
            if step is None or int(step) <= run.step or not all(_finite(v) for v in values):
                return True                        # nothing to add: no epoch, one already recorded, or NaN
            run.step = int(step)
            run.history.append((run.step, tuple(float(v) for v in values)))
            if len(self._metrics) == 1:
                self.storage.set_trial_intermediate_value(run.storage_id, run.step, float(values[0]))
            else:
                for i, metric in enumerate(self._metrics):
                    self.storage.set_trial_user_attr(run.storage_id, storage.curve_attr(metric),
                                                     [[epoch, vals[i]] for epoch, vals in run.history])
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _keep_values(self, run: _Running, result: Mapping[str, Any]) -> None:
        """The ``keep`` metrics (constrained, not objectives: what the sampler's ``constraints_func`` reads), each
        written when it changes."""
        for name in getattr(self, "_keep", ()):     # a searcher pickled before ``keep`` existed has none
            value = result.get(name)
            if _finite(value) and run.kept.get(name) != value:
                self.storage.set_trial_user_attr(run.storage_id, COST_ATTR.format(name), float(value))
                run.kept[name] = float(value)

    def _sync(self, run: _Running) -> None:
        """Take up the epochs the study holds for this trial: a trial a resumed search runs again (handed back by
        reconcile_study, or restored from Tune's older snapshot) re-reports epochs an earlier driver recorded; they
        are not recorded twice, and its best epoch is chosen over all of them."""
        trial = self.storage.get_trial(run.storage_id)
        if len(self._metrics) == 1:
            history = [(int(e), (float(v),)) for e, v in sorted(trial.intermediate_values.items()) if _finite(v)]
        else:
            curves = [dict((int(e), v) for e, v in trial.user_attrs.get(storage.curve_attr(m), []))
                      for m in self._metrics]
            history = [(e, tuple(float(c[e]) for c in curves)) for e in sorted(curves[0])
                       if all(e in c for c in curves)]
        known = {e for e, _ in run.history}
        run.history = sorted(run.history + [h for h in history if h[0] not in known])
        run.step = max([run.step, *(e for e, _ in run.history)])
        run.synced = True

    def _outcome(self, run: _Running, result: Mapping[str, Any], error: bool) -> tuple[TrialState, list | None]:
        """(state, values) to tell: FAIL, PRUNED (Optuna then takes the last intermediate value), or COMPLETE with
        the values at the epoch where the first objective was best."""
        best = ranking.best_of(run.history, lambda point: point[1][0], self._modes[0])
        failed = error or best is None or bool(result.get(self._failure_key)) or any(
            m in result and not _finite(result[m]) for m in self._metrics)
        if failed:
            return TrialState.FAIL, None
        if int(result.get("epoch", run.step)) < self._max_epochs:
            return TrialState.PRUNED, None
        assert best is not None
        return TrialState.COMPLETE, list(best[1])

    # ------------------------------------------------------------------------------------------ what comes next

    def add_trials(self, trials: Iterable[optuna.trial.FrozenTrial], source: str) -> int:
        """Copy finished trials of an earlier study (``source``: its name) into this one, for a warm start: same
        state, values, params, curve and user attrs, tagged ``warm_start.from``. A trial whose params do not fit
        this space, or whose values do not match these objectives, is skipped. Returns how many were added."""
        added = 0
        for t in trials:
            fits = t.values is not None and len(t.values) == len(self._metrics)
            if not t.state.is_finished() or set(t.params) != set(self._space) or (
                    t.state == TrialState.COMPLETE and not fits):
                continue
            try:
                copy = optuna.trial.create_trial(
                    state=t.state, values=t.values if fits else None,
                    params=t.params, distributions=self._space, intermediate_values=t.intermediate_values,
                    user_attrs={**t.user_attrs, storage.WARM_START_ATTR: f"{source}#{t.number}"})
            except ValueError as e:                # a value outside this space's range
                _log.info("warm start: trial %s#%s skipped: %s", source, t.number, e)
                continue
            self.study.add_trial(copy)
            added += 1
        return added

    # ------------------------------------------------------------------------------------------ save, restore

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = state["_backend"] = None   # reopened from the URL (or the in-memory storage) on use
        state["_study_id"] = -1
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
