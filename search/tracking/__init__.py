"""The one module that imports MLflow: search/trial runs, per-epoch metrics, the best run, the registered model.

We own the run lifecycle (Ray's ``MLflowLoggerCallback`` duplicates runs on restore and ``setup_mlflow`` leaves them
RUNNING): every call takes an explicit tracking URI and run id and goes through an ``MlflowClient``, never MLflow's
process-global active run, so several trials can log from one process or many, against one SQLite file or a server.
Layout: one parent run per search (tag ``drcaps.role=search``), one child run per Ray trial (``drcaps.role=trial``,
``drcaps.trial_id``, ``mlflow.parentRunId``). Checked against mlflow 3.17.2; MLflow is imported inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from drcapsnet.errors import TrackingError  # the store cannot be used or lacks what was asked for
from search import ranking
from search.preflight import writable_folder_problem

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Run

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_VALUE = 6000    # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.17.2)
MAX_TAG_VALUE = 8000      # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_BATCH = 100              # MAX_PARAMS_TAGS_PER_BATCH; metrics allow 1000
_OUTCOMES = {"FINISHED": "finished", "KILLED": "stopped_early", "FAILED": "failed"}
_HINT = "start the server (mlflow server --host 127.0.0.1 --port 5000) or pass --tracking-uri sqlite:///mlflow.db"
T = TypeVar("T")



@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """For the block only: no per-download progress bars (a few small files) and no warning from mlflow.pytorch
    that we pickle on purpose (see log_and_register_model); the environment and the logger are put back after."""
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
SMOKE_TAG = "drcaps.smoke_test"   # ="true" on a smoke test's parent run: every "latest"/"best" lookup skips it


# ---------------------------------------------------------------- URIs and experiments

def resolve_tracking_uri(uri: str | None, workdir: Path | None = None) -> str:
    """None -> ``sqlite:///<abs workdir or cwd>/mlflow.db``; a relative SQLite path (or bare ``*.db`` path) becomes
    absolute, since Ray trials run in another working directory; any other URI (http, databricks, ...) is kept."""
    base = (workdir or Path.cwd()).resolve()
    if uri is None:
        return f"sqlite:///{base / DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{(base / path).resolve()}{sep}{query}"
    elif "://" not in uri and ":" not in uri.split("/")[0] and uri.endswith((".db", ".sqlite")):
        return f"sqlite:///{(base / uri).resolve()}"
    return uri


def _check_host_accepted(uri: str, timeout_s: float) -> None:
    """MLflow 3's server answers API calls (not /health) with 403 "Invalid Host header" when the Host name the
    client uses is not in its ``--allowed-hosts`` (default: localhost and private IPs, so not a compose service or
    a machine's name): say so before any run is created, not in a traceback from the first trial."""
    from urllib.parse import urlsplit

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:   # noqa: S310 (http(s) only)
            resp.read(64)
    except urllib.error.HTTPError as e:
        body = e.read(512).decode(errors="replace") if e.fp else ""
        if e.code == 403 and "Invalid Host header" in body:
            host = urlsplit(uri).netloc
            name = urlsplit(uri).hostname or host
            raise TrackingError(f"tracking.uri: the MLflow server at {uri} refuses the Host name {host!r} (HTTP 403 "
                                f"Invalid Host header); start it with mlflow server --allowed-hosts "
                                f"{name},{name}:* (docker-compose.yml: MLFLOW_ALLOWED_HOSTS)") from None
    except (urllib.error.URLError, OSError):
        return                                    # /health answered; let MLflow report anything else itself


def check_tracking_uri_from_client(uri: str, option: str = "--tracking-uri") -> None:
    """Under Ray Client (``--address ray://``) the search runs on the cluster's head, not here: a SQLite file (or
    a file store) named on this machine is not there. Servers are checked where the search runs, not here."""
    if uri in ("databricks", "databricks-uc") or "://" in uri and not uri.startswith(("sqlite:", "file:")):
        return
    raise TrackingError(f"{option}: {uri} is a file on this machine, which the Ray cluster's head (where a search "
                        "started with --address ray://... runs) cannot open; give a tracking server the cluster "
                        "reaches (http://mlflow:5000 in docker-compose.yml) or leave it out to use the head's "
                        "MLFLOW_TRACKING_URI, or run the search inside the stack (docker compose exec ray-head "
                        "drcaps search ... --address auto)")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None


def sqlite_file_problem(path: Path) -> str | None:
    """Why a SQLite database cannot be created or written at ``path``, or None. Creates nothing."""
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    if path.exists():
        return None if os.access(path, os.R_OK | os.W_OK) and os.access(path.parent, os.W_OK) \
            else f"{path} is not writable"
    return writable_folder_problem(path.parent)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any work and without writing anything: an http(s) server must answer ``/health``; a
    SQLite file must be absolute and creatable (or writable); MLflow's file store (refused by default in 3.x) and
    schemes MLflow has no store for are rejected with the fix."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:   # noqa: S310 (http(s) only, checked above)
                resp.read(64)
        except urllib.error.HTTPError as e:
            raise TrackingError(f"tracking.uri: {uri} answered GET /health with HTTP {e.code}; is it an MLflow "
                                f"tracking server? {_HINT}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingError(f"tracking.uri: cannot reach {uri}: {reason}; {_HINT}") from e
        _check_host_accepted(uri, timeout_s)
    elif (path := _sqlite_path(uri)) is not None:
        if str(path) in ("", ":memory:") or not path.is_absolute():
            raise TrackingError(f"tracking.uri: {uri} must name an absolute SQLite file that trial processes "
                                "can share (use resolve_tracking_uri)")
        if problem := sqlite_file_problem(path):
            raise TrackingError(f"tracking.uri: cannot write the MLflow store {uri}: {problem}; pass "
                                "--tracking-uri sqlite:///<writable folder>/mlflow.db")
    elif uri.startswith("file:") or "://" not in uri and uri not in ("databricks", "databricks-uc"):
        raise TrackingError(f"tracking.uri: {uri} is an MLflow file store, which MLflow 3.x refuses by default; "
                            f"use sqlite:///<abs path>/{DEFAULT_DB} or an http(s) server")
    elif uri.split("://", 1)[0].split("+", 1)[0].lower() not in SCHEMES:
        raise TrackingError(f"tracking.uri: unknown scheme in {uri!r}; use sqlite:///<abs path>/{DEFAULT_DB}, "
                            f"http(s)://host:port or one of {', '.join(SCHEMES)}")


def check_store_exists(uri: str) -> None:
    """For read-only commands: a SQLite store must already exist (reading must never create an empty one)."""
    check_tracking_uri(uri)
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"--tracking-uri: no MLflow store at {path}; run 'drcaps search' there first, or pass "
                            "the --tracking-uri the search used")


def check_names(experiment: str, registered_model: str) -> None:
    """The MLflow experiment and registered-model names must be ones MLflow accepts (checked before any run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    for field, name, check in (("tracking.experiment", experiment, _validate_experiment_name),
                               ("tracking.registered_model", registered_model, _validate_model_name)):
        try:
            check(name)
        except MlflowException as e:
            raise TrackingError(f"{field}: MLflow refuses {name!r} ({e.message}); choose another name") from None


_SCHEMA_READY: set[str] = set()


def _ensure_schema(uri: str) -> None:
    """Create a new SQLite store's tables under an exclusive lock on its folder: two searches started at once in
    a fresh folder would otherwise both run MLflow's schema migration and one would crash."""
    path = _sqlite_path(uri)
    if path is None or uri in _SCHEMA_READY:
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _retry(lambda: _client(uri).search_experiments(max_results=1))   # creates the tables if missing
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _SCHEMA_READY.add(uri)


@functools.lru_cache(maxsize=16)
def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """SQLite lets one writer at a time; concurrent trials can still get "database is locked" past MLflow's
    busy_timeout (a read transaction upgrading to a write is refused at once), so back off and try again."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1 or "database is locked" not in str(e).lower():
                raise
            time.sleep(min(5.0, 0.05 * 2**i) * (1 + random.random()))
    raise AssertionError("unreachable")


def _experiment_id(uri: str, name: str) -> str:
    exp = _client(uri).get_experiment_by_name(name)
    if exp is None:
        raise TrackingError(f"tracking.experiment: no MLflow experiment named {name!r} at {uri}")
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"tracking.experiment: {name!r} at {uri} is deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another name")
    return exp.experiment_id


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing; for SQLite its artifacts go to
    ``<db folder>/mlartifacts/<name>`` (absolute), for a server to the server's default artifact root."""
    from mlflow.exceptions import MlflowException

    _ensure_schema(uri)
    if _client(uri).get_experiment_by_name(name) is None:
        db = _sqlite_path(uri)
        location = None if db is None else (db.parent / DEFAULT_ARTIFACTS / re.sub(r"[^\w.-]+", "_", name)).as_uri()
        try:
            _retry(lambda: _client(uri).create_experiment(name, artifact_location=location))
        except MlflowException as e:
            if "already exists" not in str(e).lower():                # another process created it meanwhile
                raise
    return _experiment_id(uri, name)


# ---------------------------------------------------------------- runs

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
        _retry(lambda p=chunk_p, t=chunk_t: _client(uri).log_batch(run_id, params=p, tags=t))


def start_search_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                     tags: Mapping[str, str], artifacts: Mapping[str, str | bytes] = {}) -> str:  # noqa: B006
    """Create the parent run of one search (left RUNNING) with its params, tags and text artifacts
    (``{"experiment.yaml": text, ...}``, names may contain folders); return its run id."""
    exp_id = ensure_experiment(uri, experiment)
    run = _retry(lambda: _client(uri).create_run(exp_id, run_name=run_name, tags={"drcaps.role": "search"}))
    run_id = run.info.run_id
    _log_params_and_tags(uri, run_id, params, tags)
    if artifacts:
        with tempfile.TemporaryDirectory(prefix="drcaps-artifacts-") as tmp:
            for name, content in artifacts.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            _client(uri).log_artifacts(run_id, tmp)
    return run_id


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"run and trial ids must not contain quotes or backslashes, got {value!r}")
    return f"'{value}'"


def find_or_create_trial_run(uri: str, experiment: str, *, parent_run_id: str, trial_id: str, run_name: str,
                             params: Mapping[str, Any]) -> str:
    """The child run of ``trial_id`` under ``parent_run_id``: created once; when Ray restarts the trial the same run
    is found again by its tags and set back to RUNNING. Params already logged keep their first value."""
    exp_id = ensure_experiment(uri, experiment)
    client = _client(uri)
    found = client.search_runs([exp_id], max_results=1, filter_string=(
        f"tags.mlflow.parentRunId = {_quoted(parent_run_id)} and tags.`drcaps.trial_id` = {_quoted(trial_id)}"))
    if found:
        run, old = found[0], found[0].data.tags
        _retry(lambda: client.update_run(run.info.run_id, status="RUNNING"))
        tags = {"drcaps.restarts": str(int(old.get("drcaps.restarts", "0")) + 1)}
        if "drcaps.failure_reason" in old:        # the last attempt's end(); keep it, but not as this run's outcome
            tags["drcaps.restart_reason"] = old["drcaps.failure_reason"]
        for key in ("drcaps.outcome", "drcaps.failure_reason"):
            if key in old:
                _retry(lambda k=key: client.delete_tag(run.info.run_id, k))
        new_params = {k: v for k, v in params.items() if k not in run.data.params}
        _log_params_and_tags(uri, run.info.run_id, new_params, tags)
        return run.info.run_id
    tags = {"mlflow.parentRunId": parent_run_id, "drcaps.trial_id": trial_id, "drcaps.role": "trial"}
    run = _retry(lambda: client.create_run(exp_id, run_name=run_name, tags=tags))
    _log_params_and_tags(uri, run.info.run_id, params, {})
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Set a run back to RUNNING (a resumed search reuses its parent run)."""
    _retry(lambda: _client(uri).update_run(run_id, status="RUNNING"))


def end_run(uri: str, run_id: str, status: str = "FINISHED", tags: Mapping[str, str] = {}) -> None:  # noqa: B006
    """Set ``tags`` then end the run with ``status`` (FINISHED, KILLED or FAILED)."""
    if status not in _OUTCOMES:
        raise ValueError(f"status must be one of {sorted(_OUTCOMES)}, got {status!r}")
    if tags:
        _log_params_and_tags(uri, run_id, {}, tags)
    _retry(lambda: _client(uri).set_terminated(run_id, status=status))


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
            _retry(lambda chunk=batch[i: i + 1000]: _client(self.uri).log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        _retry(lambda: _client(self.uri).log_artifact(self.run_id, str(local_path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _log_params_and_tags(self.uri, self.run_id, {}, tags)

    def end(self, status: Literal["FINISHED", "KILLED", "FAILED"], reason: str | None = None,
            outcome: str | None = None) -> None:
        """End the run; tag ``drcaps.outcome`` (finished | stopped_early | failed, unless given) and the reason."""
        tags = {"drcaps.outcome": outcome or _OUTCOMES.get(status, "failed")}
        if reason:
            tags["drcaps.failure_reason"] = reason
        end_run(self.uri, self.run_id, status, tags)


# ---------------------------------------------------------------- models

def log_and_register_model(uri: str, run_id: str, model: torch.nn.Module, input_example: torch.Tensor, *,
                           registered_name: str, alias: str = "best", description: str = "") -> str:
    """Log ``model`` to run ``run_id`` as a pickled ``nn.Module`` (cloudpickle; its class must be importable where
    it is loaded, e.g. ``drcapsnet``), register it as a new version of ``registered_name``, point ``alias`` at it.

    ``model(x)`` must return ONE tensor, e.g. ``CapsNetClassifier``: ``x (B, C, H, W) -> lengths (B, K)``; wrap
    a model whose forward returns a tuple or dict. ``input_example``: a few real-shaped samples (stored in the
    model, and the signature is inferred from it). Returns ``models:/<name>@<alias>``.
    """
    import copy

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().eval()          # don't move or mutate the caller's model
    x = input_example.detach().cpu()
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"log_and_register_model: model(x) must return one tensor (e.g. class-capsule lengths "
                        f"(B, num_classes)), got {type(y).__name__}; wrap the model")
    client = _client(uri)
    run = client.get_run(run_id)
    # Pre-create the LoggedModel: left to log_model it would land in the global/default experiment, not the run's.
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    # log_model, and the SQL registry store when it resolves a "models:/<id>" source, read only the process-global
    # tracking URI (else ./mlflow.db in the cwd): set it for this block, then restore it. Not thread-safe.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        # We pickle on purpose (see above); MLflow warns about it on every call, which a user can do nothing about.
        with _quiet_mlflow():
            info = mlflow.pytorch.log_model(
                model, name="model", run_id=run_id, model_id=logged.model_id,
                serialization_format="pickle",             # the 3.x default is "pt2" (torch.export graph module)
                signature=infer_signature(x.numpy(), y.numpy()), input_example=x.numpy(),
                pip_requirements=mlflow.pytorch.get_default_pip_requirements())   # skips an inference subprocess
        try:
            client.create_registered_model(registered_name)
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise
        version = client.create_model_version(registered_name, source=info.model_uri, run_id=run_id,
                                              model_id=info.model_id)
    finally:
        mlflow.set_tracking_uri(previous)              # None unsets it (and MLFLOW_TRACKING_URI) again
    # Link the logged model to its version as log_model(registered_model_name=...) does (the logged model's
    # "Registered versions" in the UI), so its page does not offer to register it again.
    client.set_logged_model_tags(info.model_id, {"mlflow.modelVersions": json.dumps(
        [{"name": registered_name, "version": version.version}])})
    if description:
        client.update_model_version(registered_name, version.version, description=description)
    client.set_registered_model_alias(registered_name, alias, version.version)
    return f"models:/{registered_name}@{alias}"


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a few numbers to a run at once (a search's outcome on its parent run)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
    _retry(lambda: _client(uri).log_batch(run_id, metrics=batch))


def run_url(uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's page of a run: on the server itself for an http(s) URI, else on ``ui`` (``drcaps ui``)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    exp_id = _client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


def run_age_s(uri: str, run_id: str) -> float:
    """Seconds since the run started (a search's wall time, resumes included)."""
    return max(0.0, time.time() - _client(uri).get_run(run_id).info.start_time / 1000)


def load_model(uri: str, model_uri: str) -> torch.nn.Module:
    """Load a logged PyTorch model onto the CPU from ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``runs:/...`` or a local path. Registry URIs are resolved with this ``uri`` explicitly: mlflow 3.17.2's
    ``models:/`` download path reads the process-global registry URI even when given one."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    source = model_uri
    try:
        if m := re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri):
            version = client.get_model_version_by_alias(m[1], m[2]).version
            source = client.get_model_version_download_uri(m[1], version)
        elif m := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
            source = client.get_model_version_download_uri(m[1], m[2])
    except MlflowException as e:
        raise TrackingError(f"--model-uri: {model_uri} is not in the registry at {uri} ({e.message}); "
                            "list models in 'drcaps ui', or pass the --tracking-uri the search used") from None
    with tempfile.TemporaryDirectory(prefix="drcaps-model-") as tmp:
        with _quiet_mlflow():
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
            except (MlflowException, OSError) as e:          # no such run, model, version or artifact
                text = e.message if isinstance(e, MlflowException) else str(e)
                reason = ([line.strip() for line in str(text).splitlines() if line.strip()] or [type(e).__name__])[-1]
                raise TrackingError(f"--model-uri: cannot load {model_uri} from {uri} ({reason}); pass e.g. "
                                    "models:/<name>@best, models:/<name>/<version> or runs:/<run id>/model") from None
            return mlflow.pytorch.load_model(local, map_location="cpu")


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Copy a run's artifact (file or folder) into ``dst``; returns the local path."""
    import mlflow.artifacts

    with _quiet_mlflow():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst),
                                                    tracking_uri=uri)
    return Path(local)


def read_text_artifact(uri: str, run_id: str, artifact_path: str) -> str:
    """The text of one small artifact of a run (e.g. the search's ``resolved_experiment.json``)."""
    with tempfile.TemporaryDirectory(prefix="drcaps-artifact-") as tmp:
        return download_artifacts(uri, run_id, artifact_path, Path(tmp)).read_text(encoding="utf-8")


# ---------------------------------------------------------------- queries

@dataclass(frozen=True)
class RunRecord:
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]      # the last logged value (highest step) of each metric
    tags: dict[str, str]
    status: str
    artifact_uri: str


def _record(run: Run) -> RunRecord:
    return RunRecord(run.info.run_id, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags),
                     run.info.status, run.info.artifact_uri)


def _search_all(uri: str, exp_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = _client(uri).search_runs([exp_id], filter_string, max_results=1000,
                                        order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(uri: str, parent_run_id: str) -> list[RunRecord]:
    """The trial runs of one search, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        exp_id = _client(uri).get_run(parent_run_id).info.experiment_id
    except MlflowException as e:
        raise TrackingError(f"no MLflow run {parent_run_id!r} at {uri}: {e.message}") from e
    return [_record(r) for r in _search_all(uri, exp_id, f"tags.mlflow.parentRunId = {_quoted(parent_run_id)}")]


def latest_search_run(uri: str, experiment: str) -> RunRecord | None:
    """The newest search (parent) run of ``experiment``. Smoke tests (tag ``drcaps.smoke_test``) never count where
    a real search exists (a smoke test records in its own ``<experiment>-smoke``, where only smoke runs are)."""
    exp_id = _experiment_id(uri, experiment)
    runs = _client(uri).search_runs([exp_id], "tags.`drcaps.role` = 'search'", max_results=50,
                                    order_by=["attributes.start_time DESC"])
    real = [r for r in runs if r.data.tags.get(SMOKE_TAG) != "true"] or runs
    return _record(real[0]) if real else None


def best_trial_run(uri: str, experiment: str, metric: str, mode: str,
                   parent_run_id: str | None = None) -> RunRecord:
    """The best trial run of ``parent_run_id`` (default: the latest search), ranked as everywhere in drcaps
    (``search.ranking``): by the best value of ``metric`` at ANY epoch, not the last. The search's own choice
    (its ``drcaps.best_run_id`` tag, written from the same ranking) wins when present; FAILED runs are left out.
    The record's ``metrics`` are those of the trial's best epoch."""
    ranking.sign(mode)                                       # ValueError for a bad mode
    if parent_run_id is None:
        parent = latest_search_run(uri, experiment)
        if parent is None:
            raise TrackingError(f"tracking.experiment: {experiment!r} at {uri} has no search run yet")
        parent_run_id = parent.run_id
    runs = child_runs(uri, parent_run_id)
    chosen_id = _client(uri).get_run(parent_run_id).data.tags.get("drcaps.best_run_id")
    best: dict[str, tuple[int, float] | None] = {
        r.run_id: ranking.best_epoch(metric_history(uri, r.run_id, metric), mode)
        for r in runs if r.status != "FAILED" and metric in r.metrics}
    scored = [r for r in runs if best.get(r.run_id) is not None]
    if not scored:
        seen = sorted({k for r in runs for k in r.metrics})
        raise TrackingError(f"search run {parent_run_id}: none of its {len(runs)} trial runs logged {metric!r} "
                            f"without failing (metrics logged: {seen})")
    pick = next((r for r in scored if r.run_id == chosen_id), None)
    if pick is None:
        pick = ranking.rank(scored, lambda r: best[r.run_id][1], mode)[0]   # type: ignore[index]
    epoch = best[pick.run_id][0]                                              # type: ignore[index]
    at_best = {key: value for key in pick.metrics
               for step, value in metric_history(uri, pick.run_id, key) if step == epoch}
    return dataclasses.replace(pick, metrics=pick.metrics | at_best)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` sorted by step (for trials: step = epoch)."""
    history = _client(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def trials_dataframe(uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per trial: run_id, trial_id, status, outcome, ``params.*`` (strings) and ``metrics.*`` (last values)."""
    import pandas as pd

    rows = [{"run_id": r.run_id, "trial_id": r.tags.get("drcaps.trial_id"), "status": r.status,
             "outcome": r.tags.get("drcaps.outcome")}
            | {f"params.{k}": v for k, v in sorted(r.params.items())}
            | {f"metrics.{k}": v for k, v in sorted(r.metrics.items())}
            for r in child_runs(uri, parent_run_id)]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "trial_id", "status", "outcome"])


# ---------------------------------------------------------------- report queries (search/report.py)

def search_runs(uri: str, experiment: str) -> list[RunRecord]:
    """Every search (parent) run of ``experiment``, newest first."""
    exp_id = _experiment_id(uri, experiment)
    return [_record(r) for r in reversed(_search_all(uri, exp_id, "tags.`drcaps.role` = 'search'"))]


def get_run(uri: str, run_id: str) -> RunRecord:
    from mlflow.exceptions import MlflowException

    try:
        return _record(_client(uri).get_run(run_id))
    except MlflowException as e:
        raise TrackingError(f"no MLflow run {run_id!r} at {uri}: {e.message}") from e


def log_run_artifact(uri: str, run_id: str, local_path: Path, artifact_path: str | None = None) -> None:
    """Log one local file to any run (e.g. the report, to a search's parent run after it ended)."""
    _retry(lambda: _client(uri).log_artifact(run_id, str(local_path), artifact_path))


def model_version(uri: str, name: str, alias: str) -> dict[str, str]:
    """The registered version ``name@alias``: its version, run id, source URI and logged model id (if any)."""
    from mlflow.exceptions import MlflowException

    try:
        v = _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise TrackingError(f"no model version {name}@{alias} at {uri}: {e.message}") from e
    model_id = v.model_id or (v.source.removeprefix("models:/") if v.source.startswith("models:/m-") else "")
    return {"version": str(v.version), "run_id": v.run_id or "", "source": v.source, "model_id": model_id or ""}
