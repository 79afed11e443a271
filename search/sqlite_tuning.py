"""SQLite settings for the search's two stores (Optuna's study, MLflow's runs): WAL journal, ``synchronous=NORMAL``.

Owns one thing: how a SQLAlchemy engine on a SQLite file opens its connections (Optuna's storage here;
MLflow's engine is handed in by search/tracking/client.py). Nothing else in drcaps sets
SQLite pragmas (MLflow sets its own ``foreign_keys``/``busy_timeout`` per session; those are left alone).

Why (issue 9, "Scale", docs/benchmarks.md): with SQLite's defaults (rollback journal, ``synchronous=FULL``) every
commit waits for several fsyncs, ~90 ms on the shared disk measured, and a search commits constantly: each Optuna
``ask`` and ``tell``, each epoch's intermediate value from the driver, each epoch's ``log_batch`` from every trial.
In WAL mode a commit appends to ``<file>-wal`` and, with ``synchronous=NORMAL``, does not fsync (the WAL is synced
at checkpoints); readers do not block the writer, nor the writer the readers.

Durability, honestly: WAL + ``synchronous=NORMAL`` can lose the last transactions committed before a power loss or
an OS crash (not a crash of the process: those are kept); it never corrupts the file. A lost last epoch or trial
state is what ``drcaps search --resume`` already repairs. WAL needs every process on ONE machine (shared memory in
``<file>-shm``): SQLite on a network file system shared by several nodes is not supported either way, use
PostgreSQL there (docs/cluster.md). The journal mode is stored in the file itself, so once set every later
connection (another process, the ``sqlite3`` shell, Optuna Dashboard) uses WAL too; ``synchronous`` is per
connection, hence the connect hook. ``DRCAPS_SQLITE_TUNING=0`` turns all of this off (for a before/after benchmark;
a file already in WAL mode stays in it).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import sqlalchemy

__all__ = ["DISABLE_ENV", "tune_engine", "tuned_optuna_storage"]

DISABLE_ENV = "DRCAPS_SQLITE_TUNING"    # "0": leave SQLite's defaults (rollback journal, synchronous=FULL)
_log = logging.getLogger(__name__)


def enabled() -> bool:
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
    if engine.dialect.name != "sqlite" or not enabled():
        return False
    from sqlalchemy import event

    if not event.contains(engine, "connect", _on_connect):
        event.listen(engine, "connect", _on_connect)
        engine.dispose()             # connections pooled before the hook reopen tuned
    return True


def tuned_optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's ``RDBStorage(url)``, its engine tuned by ``tune_engine`` (also after unpickling: Tune saves the
    searcher, storage included, and restores it on ``--resume``)."""
    return _storage_class()(url)


_StorageClass: type | None = None


def _storage_class() -> type:
    global _StorageClass
    if _StorageClass is None:
        import optuna

        class TunedRDBStorage(optuna.storages.RDBStorage):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)    # creates the tables (if missing) before any hook can run
                if tune_engine(self.engine):
                    self.engine.connect().close()    # switch the file to WAL now, not at the next query

            def __setstate__(self, state: dict[Any, Any]) -> None:
                super().__setstate__(state)
                tune_engine(self.engine)

        TunedRDBStorage.__module__, TunedRDBStorage.__qualname__ = __name__, "TunedRDBStorage"
        _StorageClass = TunedRDBStorage
    return _StorageClass


def __getattr__(name: str) -> Any:
    """``TunedRDBStorage`` is built on first use (Optuna is imported then), and found here by pickle."""
    if name == "TunedRDBStorage":
        return _storage_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
