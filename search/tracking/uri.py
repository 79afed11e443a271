"""Tracking URIs: where a search's MLflow store is, and whether it can be used, checked before any run is created.

Owns ``resolve_tracking_uri`` (relative SQLite paths made absolute), the up-front checks (a server answers and accepts
our Host name, a SQLite file is creatable or writable, no file store, a known scheme, names MLflow accepts) and the
Ray Client check. Writes nothing; MLflow is imported only by ``check_names``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from drcapsnet.errors import TrackingError
from search import stores

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
RDB_SCHEMES = ("postgresql", "mysql", "mssql")      # MLflow's SQLAlchemy stores on a database server
_HINT = "start the server (mlflow server --host 127.0.0.1 --port 5000) or pass --tracking-uri sqlite:///mlflow.db"


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), or None for any other URI."""
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None


def sqlite_file_problem(path: Path) -> str | None:
    """Why a SQLite database cannot be created or written at ``path`` (the file, and its folder, where SQLite
    writes its -wal and -shm files), or None. Asks the filesystem; creates nothing that stays."""
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    return stores.file_problem(path)


def check_tracking_uri(uri: str, timeout_s: float = 5.0, *, writing: bool = True) -> None:
    """Fail fast, before any work and without writing anything: an http(s) server must answer ``/health``; a
    SQLite file must be absolute and creatable (or writable), a database if it exists and (``writing``) on a
    filesystem with room for a search; a database server needs its driver and must listen (password masked);
    MLflow's file store (refused by default in 3.x) and schemes MLflow has no store for are rejected with the fix."""
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
    elif (path := sqlite_path(uri)) is not None:
        if str(path) in ("", ":memory:") or not path.is_absolute():
            raise TrackingError(f"tracking.uri: {uri} must name an absolute SQLite file that trial processes "
                                "can share (use resolve_tracking_uri)")
        if problem := sqlite_file_problem(path):
            raise TrackingError(f"tracking.uri: cannot write the MLflow store {uri}: {problem}; pass "
                                "--tracking-uri sqlite:///<writable folder>/mlflow.db")
        if problem := stores.sqlite_problem(path):
            raise TrackingError(f"tracking.uri: the MLflow store {problem}; move it aside (mv {path} {path}.bad) "
                                "or pass --tracking-uri sqlite:///<another file>")
        if writing and (problem := stores.space_problem(path.parent)):
            raise TrackingError(f"tracking.uri: {problem}; free some space, or pass --tracking-uri "
                                "sqlite:///<folder on another filesystem>/mlflow.db")
    elif uri.startswith("file:") or "://" not in uri and uri not in ("databricks", "databricks-uc"):
        raise TrackingError(f"tracking.uri: {uri} is an MLflow file store, which MLflow 3.x refuses by default; "
                            f"use sqlite:///<abs path>/{DEFAULT_DB} or an http(s) server")
    elif (scheme := uri.split("://", 1)[0].split("+", 1)[0].lower()) not in SCHEMES:
        raise TrackingError(f"tracking.uri: unknown scheme in {stores.masked(uri)!r}; use sqlite:///<abs path>/"
                            f"{DEFAULT_DB}, http(s)://host:port or one of {', '.join(SCHEMES)}")
    elif scheme in RDB_SCHEMES and (problem := stores.server_problem(uri)):
        raise TrackingError(f"tracking.uri: {problem}")


def check_store_exists(uri: str) -> None:
    """For read-only commands: a SQLite store must already exist (reading must never create an empty one)."""
    check_tracking_uri(uri, writing=False)
    path = sqlite_path(uri)
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
