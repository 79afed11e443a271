"""The connection to a store: one ``MlflowClient`` per tracking URI, the retry on "database is locked", a new SQLite
store's schema created under a lock, MLflow's noise silenced for a block, and the experiment looked up or created.

Every other module of ``search.tracking`` reaches MLflow through ``mlflow_client(uri)`` and wraps its writes in
``with_retry``; nothing here touches MLflow's process-global state (active run, tracking URI) or runs at import.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from drcapsnet.errors import TrackingError
from search import stores
from search.storage import tune_engine
from search.tracking.uri import DEFAULT_ARTIFACTS, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
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


@functools.lru_cache(maxsize=16)
def mlflow_client(uri: str) -> MlflowClient:
    """The ``MlflowClient`` of ``uri`` (tracking and registry), one per URI per process."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as e:                            # MLflow opens (and migrates) a SQL store here
        if problem := _store_problem(e):
            raise TrackingError(f"tracking.uri: the MLflow store {stores.masked(uri)} {problem}") from None
        raise
    _tune_sqlite(client)
    return client


# What SQLite says, and what it means for the user (the up-front checks catch these first: search/stores.py).
_STORE_FAULTS = {
    "file is not a database": "is not a readable database (file is not a database); move it aside or point "
                              "--tracking-uri elsewhere",
    "database disk image is malformed": "is corrupt (database disk image is malformed); move it aside or point "
                                        "--tracking-uri elsewhere",
    "database or disk is full": "cannot be written: its filesystem is full (database or disk is full); free some "
                                "space, or point --tracking-uri at another filesystem",
}


def _store_problem(error: BaseException) -> str | None:
    text = str(error).lower()
    return next((what for key, what in _STORE_FAULTS.items() if key in text), None)


def _tune_sqlite(client: MlflowClient) -> None:
    """A SQLite store: WAL and ``synchronous=NORMAL`` on its engine (search/storage.py). MLflow 3.17 keeps one
    SQLAlchemy engine per URI, shared by every client of the process; its own set-up (mlflow/store/db/utils.py) sets
    no journal mode and no synchronous level. Any other store is left alone."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is not None:
        tune_engine(engine)


def with_retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call ``fn()``; if it raises an error whose text says "database is locked", wait and call it again, up to
    ``attempts`` calls in all (backoff 0.05 s doubling, capped at 5 s, plus jitter). Any other error, or the last
    attempt's, is raised at once. SQLite lets one writer at a time; concurrent trials can still get "database is
    locked" past MLflow's busy_timeout (a read transaction upgrading to a write is refused at once)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1 or "database is locked" not in str(e).lower():
                raise
            time.sleep(min(5.0, 0.05 * 2**i) * (1 + random.random()))
    raise AssertionError("unreachable")


_SCHEMA_READY: set[str] = set()


def _ensure_schema(uri: str) -> None:
    """Create a new SQLite store's tables under an exclusive lock on its folder: two searches started at once in
    a fresh folder would otherwise both run MLflow's schema migration and one would crash."""
    path = sqlite_path(uri)
    if path is None or uri in _SCHEMA_READY:
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with_retry(lambda: mlflow_client(uri).search_experiments(max_results=1))   # creates the tables if missing
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _SCHEMA_READY.add(uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of the existing, not deleted experiment ``name``; ``TrackingError`` otherwise."""
    exp = mlflow_client(uri).get_experiment_by_name(name)
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
    if mlflow_client(uri).get_experiment_by_name(name) is None:
        db = sqlite_path(uri)
        location = None if db is None else (db.parent / DEFAULT_ARTIFACTS / re.sub(r"[^\w.-]+", "_", name)).as_uri()
        try:
            with_retry(lambda: mlflow_client(uri).create_experiment(name, artifact_location=location))
        except MlflowException as e:
            if "already exists" not in str(e).lower():                # another process created it meanwhile
                raise
    return experiment_id(uri, name)
