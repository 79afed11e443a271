"""What a place must be before a search writes there, asked of the system itself and leaving nothing behind.

- a folder files can be created in: a temporary file is created and removed in the nearest existing folder (for root
  ``os.access`` says yes to a read-only mount or a pseudo-filesystem such as /proc, so it is not asked);
- room on its filesystem: at least ``$DRCAPS_MIN_FREE_MB`` (default 100) MiB free;
- an existing SQLite file that is a database: its header, then its schema read with ``immutable=1`` (no journal, no
  WAL or shm file created, the file untouched);
- a database server URL (PostgreSQL, MySQL, ...): something listening at its host and port within a few seconds,
  and its SQLAlchemy driver installed; its password never shown (``masked``).

Each function returns why not (one clause, no field name: the caller names its flag or field) or None. The
preflight checks (search/preflight.py) and the tracking URI checks (search/tracking/uri.py) call them.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from drcapsnet.errors import UsageError

MIN_FREE_ENV = "DRCAPS_MIN_FREE_MB"
# A floor, not a search's size: the MLflow schema (0.9 MiB, measured; migrated in place), the Optuna schema, Ray's
# trial folders and the first checkpoints (the paper's network: 31 MiB of fp32 weights, more with Adam's state).
DEFAULT_MIN_FREE_MB = 100
SQLITE_HEADER = b"SQLite format 3\x00"
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
CLUSTER_EXTRA = "pip install 'drcaps[cluster]'"


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(path: Path) -> str | None:
    """Why files cannot be created under the folder ``path`` (made on demand), or None: the nearest existing folder
    must be a folder, and creating (then removing) a temporary file in it must succeed."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".drcaps-probe-", dir=existing)
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def file_problem(path: Path) -> str | None:
    """Why the file ``path`` cannot be written (created or replaced), or None. An existing file is never opened:
    closing any descriptor of a file drops every POSIX lock this process holds on it, and the file may be a SQLite
    store this process has open (a second search in one process lost the first's engine's locks, then its trial
    runs' rows). Its permission bits are asked, and its folder's filesystem is probed with a temporary file."""
    if path.is_dir():
        return f"{path} is a folder"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable (Permission denied)"
    return folder_problem(path.parent)


def min_free_bytes() -> int:
    """The free space a search needs: ``$DRCAPS_MIN_FREE_MB`` MiB (0 turns the check off), default 100."""
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    if not text:
        return DEFAULT_MIN_FREE_MB * 2**20
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib >= 0:
        raise UsageError(f"{MIN_FREE_ENV}: {text!r} is not a number of MiB >= 0; unset it for the default "
                         f"({DEFAULT_MIN_FREE_MB})")
    return int(mib * 2**20)


def space_problem(path: Path) -> str | None:
    """Why the filesystem holding ``path`` (or its nearest existing ancestor) has too little room for a search."""
    need = min_free_bytes()
    existing = nearest_existing(path)
    if need == 0 or not existing.is_dir():
        return None
    stat = os.statvfs(existing)
    free = stat.f_bavail * stat.f_frsize
    if free >= need:
        return None
    return (f"only {free / 2**20:,.1f} MiB free on the filesystem of {existing}, and a search needs "
            f"{need / 2**20:,.6g} MiB there (stores, checkpoints, Ray's results; ${MIN_FREE_ENV} sets the figure)")


def sqlite_problem(path: Path) -> str | None:
    """Why the existing file ``path`` is not a readable SQLite database, or None (also None for a missing or an
    empty file: SQLite starts an empty one). Reads only: nothing is created beside it and the file is unchanged."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    if not os.access(path, os.R_OK):
        return f"cannot read {path} (Permission denied)"
    # Read through SQLite itself, never with a plain open(): closing any file descriptor of a file drops every POSIX
    # lock this process holds on it, so a plain read of a store this process has open (a second search, a report
    # after a search) would silently unlock it under its connections. SQLite's own close defers that while locks
    # are held. immutable: no locks taken, no -wal/-shm/-journal file created.
    uri = f"{path.as_uri()}?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if "file is not a database" in str(e):
            return f"{path} is not a SQLite database (file is not a database)"
        if "unable to open" in str(e):
            return f"cannot read {path} ({e})"
        return f"{path} is not a readable SQLite database ({e})"
    return None


def masked(url: str) -> str:
    """``url`` with its password shown as ``***`` (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:                                  # not a URL SQLAlchemy reads: hide everything before '@'
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


def server_problem(url: str, timeout_s: float = 3.0) -> str | None:
    """Why the database server URL ``url`` cannot be used, or None: SQLAlchemy must read it, something must accept
    a TCP connection at its host and port within ``timeout_s``, and its driver must be installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = masked(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        return f"{shown} is not a database URL SQLAlchemy reads ({e})"
    if parsed.host and not parsed.host.startswith("/"):             # else a Unix socket: no TCP to try
        port = parsed.port or DEFAULT_PORTS.get(parsed.get_backend_name(), 0)
        try:
            socket.create_connection((parsed.host, port), timeout=timeout_s).close()
        except OSError as e:
            return (f"cannot reach the database server of {shown} at {parsed.host}:{port} within {timeout_s:g} s "
                    f"({e.strerror or e or 'timed out'}); start it, or check the host and port")
    try:
        dialect.import_dbapi()
    except ImportError as e:
        module = e.name or dialect.driver
        fix = {"psycopg2": CLUSTER_EXTRA,
               "psycopg": f"write postgresql+psycopg2://... and {CLUSTER_EXTRA} (psycopg2)"}.get(
                   module, f"install it, or use PostgreSQL: postgresql+psycopg2://... and {CLUSTER_EXTRA}")
        return f"{shown} needs the Python driver {module!r}, which is not installed; {fix}"
    return _login_problem(parsed, shown, timeout_s)


def _login_problem(parsed: Any, shown: str, timeout_s: float) -> str | None:
    """Log in once with the driver's own connect timeout (PostgreSQL, MySQL): a server that accepts TCP but never
    answers, a wrong password or a missing database is one line here, not a hang or a traceback in the search."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    if parsed.get_backend_name() not in ("postgresql", "mysql", "mariadb"):
        return None
    engine = create_engine(parsed, poolclass=NullPool, connect_args={"connect_timeout": max(1, round(timeout_s))})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:                             # the driver's OperationalError, wrapped by SQLAlchemy
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        said = (reason[0] if reason else type(e).__name__).replace(parsed.password or "\0", "***")
        return (f"the database server of {shown} does not let drcaps in within {timeout_s:g} s ({said}); check that "
                "it runs there and the user, password and database name")
    finally:
        engine.dispose()
    return None
