"""The run lifecycle we own: a search's parent run, one child run per trial (found again when Ray restarts it), runs
reopened and ended with an outcome, and what is written to a run (params, tags, metrics, artifacts).

We own it rather than Ray's ``MLflowLoggerCallback`` (duplicates runs on restore) or ``setup_mlflow`` (leaves them
RUNNING): every call takes an explicit tracking URI and run id, never MLflow's process-global active run, so several
trials can log from one process or many, against one SQLite file or a server. Long params and tags are truncated to
MLflow's limits with a marker; non-finite metrics are skipped.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from search.tracking.client import ensure_experiment, mlflow_client, with_retry
from search.tracking.queries import quoted

MAX_PARAM_VALUE = 6000    # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.17.2)
MAX_TAG_VALUE = 8000      # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_BATCH = 100              # MAX_PARAMS_TAGS_PER_BATCH; metrics allow 1000
_OUTCOMES = {"FINISHED": "finished", "KILLED": "stopped_early", "FAILED": "failed"}


def _truncate(text: str, limit: int) -> str:
    marker = f"...[truncated {len(text)} chars]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return _truncate(text, MAX_PARAM_VALUE)


def _log_params_and_tags(uri: str, run_id: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    ps = [Param(k, _param_value(v)) for k, v in params.items()]
    ts = [RunTag(k, _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
    for i in range(0, max(len(ps), len(ts)), _BATCH):
        chunk_p, chunk_t = ps[i: i + _BATCH], ts[i: i + _BATCH]
        with_retry(lambda p=chunk_p, t=chunk_t: mlflow_client(uri).log_batch(run_id, params=p, tags=t))


def start_search_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                     tags: Mapping[str, str], artifacts: Mapping[str, str | bytes] = {}) -> str:  # noqa: B006
    """Create the parent run of one search (left RUNNING) with its params, tags and text artifacts
    (``{"experiment.yaml": text, ...}``, names may contain folders); return its run id."""
    exp_id = ensure_experiment(uri, experiment)
    run = with_retry(lambda: mlflow_client(uri).create_run(exp_id, run_name=run_name, tags={"drcaps.role": "search"}))
    run_id = run.info.run_id
    _log_params_and_tags(uri, run_id, params, tags)
    if artifacts:
        with tempfile.TemporaryDirectory(prefix="drcaps-artifacts-") as tmp:
            for name, content in artifacts.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            mlflow_client(uri).log_artifacts(run_id, tmp)
    return run_id


def _identities(parent_run_id: str, trial_id: str, number: int | None, tags: Mapping[str, str]) -> list[str]:
    """The filters that find a trial's run again, in turn: its Optuna trial number (a confirmation run: the trial it
    confirms and its seed), which stays when Ray brings the trial back under a new trial id; then Ray's trial id (a
    run recorded before runs carried their number)."""
    where = f"tags.mlflow.parentRunId = {quoted(parent_run_id)}"
    by_id = f"{where} and tags.`drcaps.trial_id` = {quoted(trial_id)}"
    if number is None:
        return [by_id]
    if tags.get("drcaps.role") == "confirm":
        return [f"{where} and tags.`drcaps.role` = 'confirm' and tags.`drcaps.confirms_trial` = {quoted(str(number))}"
                f" and tags.`drcaps.confirm_seed` = {quoted(str(tags.get('drcaps.confirm_seed')))}", by_id]
    return [f"{where} and tags.`drcaps.role` = 'trial' and tags.`drcaps.trial_number` = {quoted(str(number))}", by_id]


def find_or_create_trial_run(uri: str, experiment: str, *, parent_run_id: str, trial_id: str, run_name: str,
                             params: Mapping[str, Any], tags: Mapping[str, str] = {},  # noqa: B006
                             number: int | None = None) -> str:
    """The child run of one trial under ``parent_run_id``: created once; when Ray restarts the trial the same run
    is found again and set back to RUNNING. ``number``: the Optuna trial number (tag ``drcaps.trial_number``), which
    finds the run even when a resumed search brings the trial back under a new Ray ``trial_id`` (Ray restored a
    snapshot older than the trial); the run's ``drcaps.trial_id`` then becomes the new id and the old ones are kept
    in ``drcaps.earlier_trial_ids``. Without it, the run is found by ``trial_id``. Params already logged keep their
    first value. ``tags``: set when the run is created (``drcaps.role``: ``trial`` by default, ``confirm`` for a
    confirmation run, found by ``drcaps.confirms_trial`` and ``drcaps.confirm_seed``)."""
    exp_id = ensure_experiment(uri, experiment)
    client = mlflow_client(uri)
    numbered = {"drcaps.trial_number": str(number)} if number is not None and tags.get("drcaps.role", "trial") == \
        "trial" else {}
    found = []
    for where in _identities(parent_run_id, trial_id, number, {"drcaps.role": "trial", **tags}):
        found = client.search_runs([exp_id], where, max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            break
    if found:
        run, old = found[0], found[0].data.tags
        with_retry(lambda: client.update_run(run.info.run_id, status="RUNNING"))
        tags = {"drcaps.restarts": str(int(old.get("drcaps.restarts", "0")) + 1), **numbered}
        if old.get("drcaps.trial_id", trial_id) != trial_id:     # the same trial, back under a new Ray trial id
            earlier = [t for t in old.get("drcaps.earlier_trial_ids", "").split(",") if t]
            tags |= {"drcaps.trial_id": trial_id,
                     "drcaps.earlier_trial_ids": ",".join([*earlier, old["drcaps.trial_id"]])}
        if "drcaps.failure_reason" in old:        # the last attempt's end(); keep it, but not as this run's outcome
            tags["drcaps.restart_reason"] = old["drcaps.failure_reason"]
        for key in ("drcaps.outcome", "drcaps.failure_reason"):
            if key in old:
                with_retry(lambda k=key: client.delete_tag(run.info.run_id, k))
        new_params = {k: v for k, v in params.items() if k not in run.data.params}
        _log_params_and_tags(uri, run.info.run_id, new_params, tags)
        return run.info.run_id
    created = {"mlflow.parentRunId": parent_run_id, "drcaps.trial_id": trial_id, "drcaps.role": "trial", **numbered,
               **tags}
    run = with_retry(lambda: client.create_run(exp_id, run_name=run_name, tags=created))
    _log_params_and_tags(uri, run.info.run_id, params, {})
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Set a run back to RUNNING (a resumed search reuses its parent run)."""
    with_retry(lambda: mlflow_client(uri).update_run(run_id, status="RUNNING"))


def end_run(uri: str, run_id: str, status: str = "FINISHED", tags: Mapping[str, str] = {}) -> None:  # noqa: B006
    """Set ``tags`` then end the run with ``status`` (FINISHED, KILLED or FAILED)."""
    if status not in _OUTCOMES:
        raise ValueError(f"status must be one of {sorted(_OUTCOMES)}, got {status!r}")
    if tags:
        _log_params_and_tags(uri, run_id, {}, tags)
    with_retry(lambda: mlflow_client(uri).set_terminated(run_id, status=status))


class TrialLogger:
    """Everything one trial writes to MLflow, bound to one run id (no global MLflow state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id

    def log_epoch(self, metrics: Mapping[str, float], step: int) -> None:
        """One ``log_batch`` per epoch with ``step=epoch``; non-numeric and non-finite values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if isinstance(value, bool | str | bytes):
                continue
            try:
                number = float(value)   # int, float, numpy scalar, 0-d tensor
            except (TypeError, ValueError, RuntimeError):
                continue
            if math.isfinite(number):
                batch.append(Metric(key, number, now, int(step)))
        for i in range(0, len(batch), 1000):
            with_retry(lambda chunk=batch[i: i + 1000]: mlflow_client(self.uri).log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        log_run_artifact(self.uri, self.run_id, local_path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _log_params_and_tags(self.uri, self.run_id, {}, tags)

    def end(self, status: Literal["FINISHED", "KILLED", "FAILED"], reason: str | None = None,
            outcome: str | None = None) -> None:
        """End the run; tag ``drcaps.outcome`` (finished | stopped_early | failed, unless given) and the reason."""
        tags = {"drcaps.outcome": outcome or _OUTCOMES.get(status, "failed")}
        if reason:
            tags["drcaps.failure_reason"] = reason
        end_run(self.uri, self.run_id, status, tags)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a few numbers to a run at once (a search's outcome on its parent run)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
    with_retry(lambda: mlflow_client(uri).log_batch(run_id, metrics=batch))


def log_run_artifact(uri: str, run_id: str, local_path: Path, artifact_path: str | None = None) -> None:
    """Log one local file to any run (e.g. the report, to a search's parent run after it ended)."""
    with_retry(lambda: mlflow_client(uri).log_artifact(run_id, str(local_path), artifact_path))


# MLflow 3.17's UI shows an experiment in its GenAI view (traces, token usage) or its model-training view, chosen by
# this query parameter, else by the browser's localStorage (``mlflow.workflowType``, GenAI in a fresh browser); the
# ``mlflow.experimentKind`` experiment tag is not read while the UI's workflow selector is on (always, in 3.17).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's page of a run, in the model-training view: on the server itself for an http(s) URI, else on
    ``ui`` (``drcaps ui``)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    exp_id = mlflow_client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def run_age_s(uri: str, run_id: str) -> float:
    """Seconds since the run started (a search's wall time, resumes included)."""
    return max(0.0, time.time() - mlflow_client(uri).get_run(run_id).info.start_time / 1000)
