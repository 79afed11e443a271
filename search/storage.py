"""Where a search's Optuna study lives and how drcaps opens it: the storage URL (SQLite beside a local MLflow store,
or the cluster's PostgreSQL), its tables created safely, the SQLite settings of both of the search's stores, and the
names of what drcaps adds to a study beside Optuna's own fields (so the report reads them without ``search.tune``).

SQLite settings (issue 9, "Scale", docs/benchmarks.md): WAL journal and ``synchronous=NORMAL``. With SQLite's
defaults (rollback journal, ``synchronous=FULL``) every commit waits for several fsyncs, ~90 ms on the shared disk
measured, and a search commits constantly: each Optuna ``ask`` and ``tell``, each epoch's intermediate value from the
driver, each epoch's ``log_batch`` from every trial. In WAL mode a commit appends to ``<file>-wal`` and, with
``synchronous=NORMAL``, does not fsync (the WAL is synced at checkpoints); readers do not block the writer, nor the
writer the readers. Nothing else in drcaps sets SQLite pragmas (MLflow sets its own ``foreign_keys``/``busy_timeout``
per session; those are left alone; its engine is handed in by search/tracking/client.py).

Durability, honestly: WAL + ``synchronous=NORMAL`` can lose the last transactions committed before a power loss or
an OS crash (not a crash of the process: those are kept); it never corrupts the file. A lost last epoch or trial
state is what ``drcaps search --resume`` already repairs. WAL needs every process on ONE machine (shared memory in
``<file>-shm``): SQLite on a network file system shared by several nodes is not supported either way, use
PostgreSQL there (docs/cluster.md). The journal mode is stored in the file itself, so once set every later
connection (another process, the ``sqlite3`` shell, Optuna Dashboard) uses WAL too; ``synchronous`` is per
connection, hence the connect hook. ``DRCAPS_SQLITE_TUNING=0`` turns all of this off (for a before/after benchmark;
a file already in WAL mode stays in it).

Optuna is imported inside the functions that need it; nothing here imports ``search.tune``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import sqlalchemy

    from search.experiment import Experiment

OPTUNA_STORAGE_ENV = "DRCAPS_OPTUNA_STORAGE"   # the Optuna storage URL as the driver's machine sees it
DISABLE_ENV = "DRCAPS_SQLITE_TUNING"           # "0": leave SQLite's defaults (rollback journal, synchronous=FULL)

# What drcaps records in a study beside Optuna's own fields (written by search/tune/study_searcher.py, confirm.py).
MLFLOW_RUN_ATTR = "mlflow_run_id"              # trial user attr: the trial's MLflow run
WARM_START_ATTR = "warm_start.from"            # trial user attr: "<study>#<number>" a trial was copied from
_log = logging.getLogger(__name__)


def curve_attr(metric: str) -> str:
    """The trial user attr holding ``[[epoch, value], ...]`` of ``metric`` (vector objectives: Optuna keeps
    intermediate values for single-objective studies only)."""
    return f"intermediate.{metric}"


def confirm_attr(number: int) -> str:
    """The study user attr holding trial ``number``'s confirmation: ``{metric: {"mean", "std", "n", ...}}``
    (written by search/tune/confirm.py; a confirmation is never a new trial)."""
    return f"confirm.{number}"


def trial_curve(trial: optuna.trial.FrozenTrial, metric: str) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` for a trial: drcaps' own record (vector objectives) when there is one, else
    Optuna's intermediate values (a single-objective study reports ``metric`` there)."""
    pairs = trial.user_attrs.get(curve_attr(metric))
    if pairs is not None:
        return {int(epoch): float(value) for epoch, value in pairs}
    return dict(trial.intermediate_values)


def confirmation(study_attrs: Mapping[str, Any], number: int) -> dict[str, dict[str, float]] | None:
    """Trial ``number``'s confirmation from a study's user attrs, or None when it was not confirmed."""
    return study_attrs.get(confirm_attr(number))


def optuna_storage_url(exp: Experiment, tracking_uri: str) -> str:
    """The experiment's ``search.storage``, else ``$DRCAPS_OPTUNA_STORAGE`` (this machine's), else SQLite next to
    a local MLflow store, else ./optuna.db."""
    if exp.search.storage:
        return exp.search.storage
    if os.environ.get(OPTUNA_STORAGE_ENV):              # the machine's own (docker-compose.yml sets it)
        return os.environ[OPTUNA_STORAGE_ENV]
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def create_optuna_schema(url: str) -> None:
    """Create a SQLite Optuna storage's tables under an exclusive lock on its folder: two searches started at once
    in a fresh folder would otherwise race in SQLAlchemy's create_all ("table ... already exists")."""
    if not url.startswith("sqlite:///"):
        return
    import fcntl

    folder = Path(url.removeprefix("sqlite:///").partition("?")[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tuned_optuna_storage(url)                # a fresh file starts in WAL mode
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def tuned_optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's plain ``RDBStorage(url)`` (its tables created if missing), its engine tuned by ``tune_engine`` and a
    SQLite file switched to WAL at once. Not meant to be pickled (a plain one unpickles untuned): whoever must be
    saved holds the URL and opens the storage again (search/tune/study_searcher.py)."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    if tune_engine(storage.engine):
        storage.engine.connect().close()         # switch the file to WAL now, not at the next query
    return storage


def sqlite_tuning_enabled() -> bool:
    """False when ``DRCAPS_SQLITE_TUNING`` is 0/false/no/off."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    """Every new DBAPI connection of a tuned engine: WAL (a no-op once the file is in WAL mode) and NORMAL sync."""
    cursor = dbapi_connection.cursor()
    try:
        mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and str(mode[0]).lower() not in ("wal", "memory"):   # ":memory:" databases stay in memory mode
            _log.warning("SQLite journal mode stays %s (WAL refused)", mode[0])
        cursor.execute("PRAGMA synchronous=NORMAL")
    except Exception as e:        # e.g. locked while switching to WAL: this connection keeps the defaults
        _log.warning("SQLite tuning skipped on one connection: %s", e)
    finally:
        cursor.close()


def tune_engine(engine: sqlalchemy.engine.Engine) -> bool:
    """Hook ``engine`` (a SQLite one; anything else is left alone) so each of its connections runs in WAL mode with
    ``synchronous=NORMAL``; connections already pooled are closed, so they reopen tuned. True if it is tuned."""
    if engine.dialect.name != "sqlite" or not sqlite_tuning_enabled():
        return False
    from sqlalchemy import event

    if not event.contains(engine, "connect", _on_connect):
        event.listen(engine, "connect", _on_connect)
        engine.dispose()             # connections pooled before the hook reopen tuned
    return True
