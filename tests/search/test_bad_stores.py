"""Stores and folders that cannot hold a search, refused up front through ``drcaps`` itself (``cli.main``) in an
empty working folder: a read-only mount and a pseudo-filesystem (root's ``os.access`` says yes to both), a filesystem
with too little room, a file that is not a SQLite database, a database server that is not there or whose driver is
missing. Each is exit code 2, ONE ``error: ...`` line naming the flag or field, the value and the fix, and nothing
written: not in the working folder, not beside the bad store (which stays byte-identical)."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.cli import main
from tests.conftest import TINY_EXPERIMENT, closed_port

SECRET = "s3cr3t-pw"


def _mount_tmpfs(folder: Path, options: str) -> str | None:
    """Mount a tmpfs on ``folder``; None, or why it could not (not root, no CAP_SYS_ADMIN, no mount binary)."""
    folder.mkdir()
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A read-only tmpfs and a 4 MiB one (room for less than a search needs)."""
    base = tmp_path_factory.mktemp("mounts")
    made = []
    for name, options in (("ro", "ro,size=1m"), ("small", "size=4m")):
        problem = _mount_tmpfs(base / name, options)
        if problem:
            for folder in made:
                subprocess.run(["umount", str(folder)], check=False)
            pytest.skip(problem)
        made.append(base / name)
    yield {"ro": str(base / "ro"), "small": str(base / "small")}
    for folder in made:
        subprocess.run(["umount", str(folder)], check=False)



@pytest.fixture(scope="module")
def listening_port() -> Iterator[int]:
    """Something that accepts TCP connections (and is not a database server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)                   # never accepts: connections wait in the backlog until they give up
        yield s.getsockname()[1]


@pytest.fixture()
def files(tmp_path: Path, listening_port: int, store: str) -> dict[str, str]:
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "exp.yaml").write_text(TINY_EXPERIMENT)
    bad = tmp_path / "bad"              # each bad store alone in its folder: nothing may appear beside it
    bad.mkdir()
    (bad / "text.db").write_text("name,value\nlr,0.1\n" * 50)
    (bad / "torn.db").write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\xab" * 4000)
    return {"exp": str(d / "exp.yaml"), "bad": str(bad), "closed": str(closed_port()),
            "open": str(listening_port), "pw": SECRET,
            "store": store}


def _pg(port: str) -> str:
    return f"postgresql+psycopg2://drcaps:{SECRET}@127.0.0.1:{port}/optuna"


# (case id, argv with {placeholders}, substrings the error line must hold)
STORES: list[tuple[str, list[str], list[str]]] = [
    ("storage-path-under-proc", ["search", "{exp}", "--storage-path", "/proc/drcaps-runs"],
     ["--storage-path", "cannot create files in /proc", "pass a writable folder"]),
    ("tracking-under-sys", ["search", "{exp}", "--tracking-uri", "sqlite:////sys/drcaps/mlflow.db"],
     ["tracking.uri", "/sys", "writable folder"]),
    ("optuna-under-proc", ["search", "{exp}", "--set", "search.storage=sqlite:////proc/x/optuna.db"],
     ["search.storage", "cannot create files in /proc"]),
    ("out-under-proc", ["search", "{exp}", "--out", "/proc/best.yaml"], ["--out", "/proc"]),
    ("export-out-under-proc", ["export-best", "--experiment", "x", "--tracking-uri", "{store}", "--out",
                               "/proc/b.yaml"], ["--out", "/proc"]),
    ("report-out-under-proc", ["report", "x", "--tracking-uri", "{store}", "--out", "/proc/r.html"],
     ["--out", "/proc"]),
    ("tracking-not-a-database", ["search", "{exp}", "--tracking-uri", "sqlite:///{bad}/text.db"],
     ["tracking.uri", "text.db is not a SQLite database (file is not a database)", "move it aside"]),
    ("tracking-torn-database", ["search", "{exp}", "--tracking-uri", "sqlite:///{bad}/torn.db"],
     ["tracking.uri", "torn.db is not a SQLite database (file is not a database)", "move it aside"]),
    ("report-not-a-database", ["report", "x", "--tracking-uri", "sqlite:///{bad}/text.db"],
     ["tracking.uri", "text.db", "not a SQLite database", "move it aside"]),
    ("export-not-a-database", ["export-best", "--experiment", "x", "--tracking-uri", "sqlite:///{bad}/torn.db",
                               "--out", "{bad}/../b.yaml"], ["tracking.uri", "torn.db", "move it aside"]),
    ("optuna-not-a-database", ["search", "{exp}", "--set", "search.storage=sqlite:///{bad}/text.db"],
     ["search.storage", "Optuna storage", "text.db is not a SQLite database", "move it aside"]),
    ("tracking-postgres-unreachable", ["search", "{exp}", "--tracking-uri", _pg("{closed}")],
     ["tracking.uri", "drcaps:***@127.0.0.1:{closed}", "cannot reach", "within 3 s"]),
    ("optuna-postgres-unreachable", ["search", "{exp}", "--set", f"search.storage={_pg('{closed}')}"],
     ["search.storage", "cannot reach", "***"]),
    ("report-postgres-unreachable", ["report", "x", "--tracking-uri", _pg("{closed}")], ["cannot reach"]),
    ("export-postgres-unreachable", ["export-best", "--experiment", "x", "--tracking-uri", _pg("{closed}"),
                                     "--out", "{bad}/../b.yaml"], ["cannot reach"]),
    ("min-free-not-a-number", ["search", "{exp}"], ["DRCAPS_MIN_FREE_MB", "'lots'"]),
    ("min-free-above-the-disk", ["search", "{exp}"], ["tracking.uri", "MiB free on the filesystem of",
                                                      "DRCAPS_MIN_FREE_MB"]),
]
ENV = {"min-free-not-a-number": "lots", "min-free-above-the-disk": str(2**40)}   # DRCAPS_MIN_FREE_MB, in MiB

DRIVERLESS = [
    ("tracking-postgres-no-driver", ["search", "{exp}", "--tracking-uri", _pg("{open}")],
     ["tracking.uri", "psycopg2", "pip install 'drcaps[cluster]'"]),
    ("optuna-postgres-no-driver", ["search", "{exp}", "--set", f"search.storage={_pg('{open}')}"],
     ["search.storage", "psycopg2", "pip install 'drcaps[cluster]'"]),
    ("report-postgres-no-driver", ["report", "x", "--tracking-uri", _pg("{open}")], ["drcaps[cluster]"]),
    ("export-postgres-no-driver", ["export-best", "--experiment", "x", "--tracking-uri", _pg("{open}"),
                                   "--out", "{bad}/../b.yaml"], ["drcaps[cluster]"]),
    ("postgres-default-driver-is-psycopg3", ["search", "{exp}", "--tracking-uri",
                                             "postgresql://u:{pw}@127.0.0.1:{open}/db"],
     ["'psycopg'", "postgresql+psycopg2://"]),
]
NO_PSYCOPG2 = pytest.mark.skipif(importlib.util.find_spec("psycopg2") is not None,
                                 reason="psycopg2 is installed here (the cluster extra): no driver to miss")

WITH_DRIVER = [
    ("tracking-postgres-silent", ["search", "{exp}", "--tracking-uri", _pg("{open}")],
     ["tracking.uri", "does not let drcaps in within 3 s", "timeout expired", "drcaps:***@"]),
    ("optuna-postgres-silent", ["search", "{exp}", "--set", f"search.storage={_pg('{open}')}"],
     ["search.storage", "does not let drcaps in"]),
    ("report-postgres-silent", ["report", "x", "--tracking-uri", _pg("{open}")], ["does not let drcaps in"]),
]
WITH_PSYCOPG2 = pytest.mark.skipif(importlib.util.find_spec("psycopg2") is None,
                                   reason="psycopg2 is not installed (pip install 'drcaps[cluster]')")

ON_MOUNTS = [
    ("storage-path-read-only", ["search", "{exp}", "--storage-path", "{ro}/runs"],
     ["--storage-path", "Read-only file system", "{ro}"]),
    ("tracking-read-only", ["search", "{exp}", "--tracking-uri", "sqlite:///{ro}/mlflow.db"],
     ["tracking.uri", "Read-only file system"]),
    ("optuna-read-only", ["search", "{exp}", "--set", "search.storage=sqlite:///{ro}/sub/optuna.db"],
     ["search.storage", "Read-only file system"]),
    ("out-read-only", ["search", "{exp}", "--out", "{ro}/best.yaml"], ["--out", "Read-only file system"]),
    ("train-save-model-read-only", ["train", "--save-model", "{ro}/m.pt", "--epochs", "1"], ["--save-model"]),
    ("storage-path-small-disk", ["search", "{exp}", "--storage-path", "{small}/runs"],
     ["--storage-path", "MiB free on the filesystem of {small}", "needs 100 MiB", "another filesystem"]),
    ("tracking-small-disk", ["search", "{exp}", "--tracking-uri", "sqlite:///{small}/mlflow.db"],
     ["tracking.uri", "MiB free", "{small}"]),
    ("optuna-small-disk", ["search", "{exp}", "--set", "search.storage=sqlite:///{small}/optuna.db"],
     ["search.storage", "MiB free", "{small}"]),
]


def _run(argv: list[str], expected: list[str], values: dict[str, str], cwd: Path,
         capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = {p: p.read_bytes() for p in Path(values["bad"]).iterdir()}
    started = time.monotonic()
    try:
        code = main([arg.format(**values) for arg in argv])
    except SystemExit as e:
        code = e.code
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text.format(**values) in err, (text, err)
    assert SECRET not in err + out, "the password must never be shown"
    assert sorted(p.name for p in cwd.iterdir()) == [], "the working folder must hold nothing new"
    assert {p: p.read_bytes() for p in Path(values["bad"]).iterdir()} == snapshot, "a bad store must stay as it was"
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DRCAPS_MIN_FREE_MB", raising=False)
    for name in ("MLFLOW_TRACKING_URI", "DRCAPS_STORAGE_PATH", "DRCAPS_OPTUNA_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    return work


@pytest.mark.parametrize(("case", "argv", "expected"), STORES, ids=[c for c, _, _ in STORES])
def test_a_store_that_cannot_hold_a_search_is_one_line(case: str, argv: list[str], expected: list[str],
                                                      files: dict[str, str], cwd: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    if case in ENV:
        monkeypatch.setenv("DRCAPS_MIN_FREE_MB", ENV[case])
    _run(argv, expected, files, cwd, capsys)


@NO_PSYCOPG2
@pytest.mark.parametrize(("argv", "expected"), [(a, e) for _, a, e in DRIVERLESS], ids=[c for c, _, _ in DRIVERLESS])
def test_a_database_server_without_its_driver_is_one_line(argv: list[str], expected: list[str],
                                                         files: dict[str, str], cwd: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _run(argv, expected, files, cwd, capsys)


@WITH_PSYCOPG2
@pytest.mark.parametrize(("argv", "expected"), [(a, e) for _, a, e in WITH_DRIVER],
                         ids=[c for c, _, _ in WITH_DRIVER])
def test_a_database_server_that_never_answers_is_one_line(argv: list[str], expected: list[str],
                                                          files: dict[str, str], cwd: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _run(argv, expected, files, cwd, capsys)     # the driver's connect_timeout: ~3 s, not a hang


@pytest.mark.parametrize(("argv", "expected"), [(a, e) for _, a, e in ON_MOUNTS], ids=[c for c, _, _ in ON_MOUNTS])
def test_a_read_only_or_full_filesystem_is_one_line(argv: list[str], expected: list[str], files: dict[str, str],
                                                   mounts: dict[str, str], cwd: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    values = files | mounts
    _run(argv, expected, values, cwd, capsys)
    assert not any(Path(mounts["small"]).iterdir()), "nothing created on the small filesystem"


def test_the_checks_leave_no_probe_behind_and_accept_a_good_place(tmp_path: Path) -> None:
    from search import stores

    assert stores.folder_problem(tmp_path / "a" / "b") is None and list(tmp_path.iterdir()) == []
    db = tmp_path / "ok.db"
    import sqlite3

    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    before = db.read_bytes(), db.stat().st_mtime_ns
    assert stores.sqlite_problem(db) is None and stores.file_problem(db) is None
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before and sorted(tmp_path.iterdir()) == [db]
    (tmp_path / "empty.db").touch()
    assert stores.sqlite_problem(tmp_path / "empty.db") is None          # SQLite starts an empty file as a database


def test_checking_a_store_this_process_holds_open_keeps_its_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it: the check must read a store
    through SQLite, or a second search (or a report) in the same process would unlock the first one's writes."""
    import sqlite3
    import subprocess
    import sys

    from search.stores import sqlite_problem

    db = tmp_path / "held.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN IMMEDIATE")                           # this process holds the write lock
    try:
        assert sqlite_problem(db) is None
        other = subprocess.run([sys.executable, "-c", (
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(db)!r}, timeout=0, isolation_level=None)\n"
            "try:\n    c.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError as e:\n    print(e)\n")],
            capture_output=True, text=True, timeout=60)
        assert "database is locked" in other.stdout, other.stdout + other.stderr
    finally:
        conn.execute("ROLLBACK")
        conn.close()
