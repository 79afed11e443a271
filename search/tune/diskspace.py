"""Room on the disks a running search writes to. The up-front check (search/stores.py) wants ``DRCAPS_MIN_FREE_MB``
free before a search starts; while it runs, :func:`watching` checks every second that each filesystem it writes to
(Ray's results, a SQLite MLflow store and its artifacts, a SQLite Optuna storage, the temporary folder where trials
work and Ray keeps its session) keeps room for the next checkpoints. When one does not, the search is stopped the way
Ctrl-C stops it (Tune saves its state, the trials stop, every finished trial stays recorded), and
:meth:`DiskWatch.raise_if_full` turns that into one line naming the filesystem and the ``--resume`` command.

Stopping before the disk is full, not after: Tune, MLflow and SQLite each fail in their own way on a full disk (a
trial's traceback, Ray retrying the trial, "database or disk is full"), and the state a resume needs could not be
written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from search.errors import SearchFailedError

FLOOR = 2 * 2**20          # bytes kept free whatever the checkpoints weigh: the experiment state, a metric row
INTERVAL_S = 1.0


def sqlite_folder(url: str) -> Path | None:
    """The folder of a ``sqlite:///`` store (its file, -wal and -shm, MLflow's artifacts beside it), else None."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").partition("?")[0]
    return Path(path).parent if path and path != ":memory:" else None


@dataclass
class DiskWatch:
    """The filesystems a search writes to (``places``: what -> a folder on it), checked against the room the next
    checkpoints need: twice the largest checkpoint of Tune's folder per trial running at once, plus ``FLOOR``."""

    places: dict[str, Path]
    tune_folder: Path
    concurrent: int
    problem: str | None = None
    largest: int = 0                   # bytes of the largest checkpoint seen in Tune's folder
    _stop: threading.Event = field(default_factory=threading.Event)

    def need(self) -> int:
        for checkpoint in self.tune_folder.glob("*/checkpoint_*"):
            with contextlib.suppress(OSError):
                self.largest = max(self.largest, sum(f.stat().st_size for f in checkpoint.iterdir()))
        return FLOOR + 2 * max(1, self.concurrent) * self.largest

    def check(self) -> str | None:
        """Why a filesystem of the search has too little room left, or None."""
        need, seen = self.need(), set()
        for place in self.places.values():
            try:
                stat = os.statvfs(place)
                device = os.stat(place).st_dev
            except OSError:
                continue
            if device in seen:
                continue
            seen.add(device)
            free = stat.f_bavail * stat.f_frsize
            if free < need:
                names = [w for w, p in self.places.items() if _device(p) == device]
                return (f"the filesystem of {place} ({', '.join(names)}) is nearly full: {free / 2**20:.1f} MiB "
                        f"free, and the next checkpoints need about {need / 2**20:.1f} MiB")
        return None

    def error(self, resume_command: str) -> SearchFailedError:
        """The search stopped because a disk filled up: one line, what to do."""
        return SearchFailedError(f"search: stopped: {self.problem}; every finished trial is recorded; free some "
                                 f"space there, then continue with: {resume_command}")


def _device(place: Path) -> int | None:
    try:
        return os.stat(place).st_dev
    except OSError:
        return None


def places_of(storage_root: Path, tracking_uri: str, storage_url: str) -> dict[str, Path]:
    """What a search writes, and where: Ray's results, the SQLite stores (none for a server), the temporary folder."""
    places = {"Ray's results (--storage-path)": storage_root,
              "the MLflow store": sqlite_folder(tracking_uri), "the Optuna storage": sqlite_folder(storage_url),
              "the temporary folder (trials' checkpoints, Ray's session)": Path(tempfile.gettempdir())}
    return {what: place for what, place in places.items() if place is not None}


@contextlib.contextmanager
def watching(places: dict[str, Path], tune_folder: Path, concurrent: int, resume_command: str, enabled: bool = True,
             interval_s: float = INTERVAL_S) -> Iterator[DiskWatch]:
    """Check the room on ``places`` every ``interval_s`` while the block runs; when it runs short, record why and
    send this process SIGINT, which Tune takes as Ctrl-C (its state saved, the trials stopped, ``fit`` returns).
    Then, or when the block fails on a disk that is short of room (a disk filled faster than it is checked: Tune
    fails reading what it could not write), raise one SearchFailedError naming the filesystem and the resume.
    ``enabled``: where Tune catches SIGINT in this process (not through Ray Client), from its main thread."""
    watch = DiskWatch(places, tune_folder, concurrent)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield watch
        return

    tune_log = logging.getLogger("ray.tune.tune")      # "Stop signal received (e.g. via SIGINT/Ctrl+C)", Tuner.restore
    level = tune_log.level

    def loop() -> None:
        while not watch._stop.wait(interval_s):
            if (problem := watch.check()) is not None:
                watch.problem = problem
                tune_log.setLevel(logging.ERROR)           # not Ctrl-C, and drcaps says how to resume
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=loop, name="drcaps-disk-watch", daemon=True)
    thread.start()
    try:
        yield watch
    except Exception:
        watch.problem = watch.problem or watch.check()
        if watch.problem is None:
            raise
        raise watch.error(resume_command) from None
    finally:
        watch._stop.set()
        thread.join(timeout=5)
        tune_log.setLevel(level)
    if watch.problem is not None:
        raise watch.error(resume_command)
