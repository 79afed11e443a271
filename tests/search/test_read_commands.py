"""The commands that only read a store (``drcaps ui``, ``report``, ``export-best``) need no free space: the
free-space floor (search/stores.py, ``DRCAPS_MIN_FREE_MB``) is for what a search writes."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

DRCAPS = Path(sys.executable).parent / "drcaps"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_opens_a_store_on_a_disk_with_less_room_than_a_search_needs(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:                  # a SQLite file: all the checks ask of an existing store
        conn.execute("CREATE TABLE t (x)")
    env = {**os.environ, "DRCAPS_MIN_FREE_MB": str(2**40)}   # 1 EiB: more than any disk here has free
    proc = subprocess.Popen([str(DRCAPS), "ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(_free_port())],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        with selectors.DefaultSelector() as sel:       # the line printed just before the UI replaces the process
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
        line = proc.stdout.readline() if ready else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert line.startswith("MLflow UI on http://127.0.0.1:"), (line, err[-2000:])
    assert "MiB free" not in err
