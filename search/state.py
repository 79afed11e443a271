"""A search's state on disk, apart from the checks that read it: the per-experiment lock, the state file that
``--resume`` reads, and the name every record of one search shares (its study name).

``<storage>/<experiment>/drcaps-search.json``: the latest search of the experiment there (parent run, study, URIs);
``<storage>/<experiment>/drcaps-search.lock``: held by the one search of it running there.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from search.errors import BusyError

STATE_FILE = "drcaps-search.json"   # <storage>/<experiment>/: the latest search of it, what --resume continues
LOCK_FILE = "drcaps-search.lock"    # <storage>/<experiment>/: held by the one search of it running there


def study_name(experiment: str) -> str:
    """A search's identity: ``<experiment>-<YYYYmmdd-HHMMSS>-<6 hex>``, unique even for searches started in the
    same second (the Optuna study, the Ray folder and the MLflow parent run's name)."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class SearchLock:
    """An exclusive ``flock`` on ``<storage>/<experiment>/drcaps-search.lock``, held while a search runs there."""

    path: Path
    handle: IO[str] | None = None

    def check_free(self, experiment: str) -> None:
        """Refuse at once, writing nothing, when another search holds the lock (before Ray starts: seconds)."""
        if not self.path.is_file():
            return
        with self.path.open("r") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(experiment, handle.read().strip()) from None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _busy(self, experiment: str, holder: str) -> BusyError:
        return BusyError(f"--storage-path: another search of '{experiment}' is running in {self.path.parent} "
                         f"({holder or 'another process'}); wait for it to end, or pass another --storage-path")

    def acquire(self, experiment: str) -> SearchLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise self._busy(experiment, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
