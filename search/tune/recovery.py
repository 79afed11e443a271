"""A search driver killed at any moment (SIGKILL, the OOM killer, a lost terminal), and what its ``--resume`` picks
up: the processes its own Ray left running, and Tune's experiment state cut short in mid-write.

- ``session_record`` goes into the state file (search/state.py) when a search starts or resumes: the session folder
  of the Ray it started here, its pid and start time. ``stop_leftovers`` reads it back at ``--resume``: with that
  driver gone, the processes of that Ray session (its agents linger for minutes with parent 1, trial workers with
  them) are stopped; a cluster's Ray, or another session, is never touched.
- ``repair_tune_state``: Tune writes its experiment state to a staging folder in Ray's session folder, then copies
  it to the search's folder. A kill during the copy leaves empty or cut files there (Tune then starts the whole
  experiment again: new trials, a study past ``num_samples``); the staging copy is whole, and put back.
- A trial's earlier attempts (on Ray's restart of it, or a resume): their temporary folders removed
  (``remove_temp_folders``), where this attempt runs and the epoch it resumed from (``node_tags``).
- ``hold``: the kill points the recovery tests (tests/search/test_kill_points.py) stop a trial at.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickletools
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from search.errors import SearchFailedError
from search.tune import runtime

# Tune's state files, one set per driver session: experiment_state-<s>.json, search_gen_state-<s>.json, ...
_STATE_FILE = re.compile(r"^(?P<kind>[\w-]+?)-(?P<session>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(json|pkl)$")


def session_record() -> dict[str, Any]:
    """What a later ``--resume`` needs to find what this search's own Ray would leave behind if this driver were
    killed: the session folder of the Ray started here, this process's pid and start time. Empty when Ray runs
    elsewhere (a cluster joined): nothing of it is ever stopped."""
    session = runtime.local_session_dir()
    if session is None:
        return {}
    return {"ray_session_dir": session, "driver_pid": os.getpid(), "driver_start": _start_time(os.getpid())}


def stop_leftovers(record: dict[str, Any], grace_s: float = 1.0) -> list[int]:
    """Stop what the local Ray of a killed search left running: only when that search's driver (``record``, from
    ``session_record``) is gone, and only processes of its Ray session (the session folder in their command line or
    among their open files), never another Ray. SIGTERM, then SIGKILL after ``grace_s`` (Ray's agents wait minutes
    on the dead GCS when asked nicely). Returns the pids stopped."""
    session, pid = record.get("ray_session_dir"), record.get("driver_pid")
    if not session or not isinstance(pid, int):
        return []                                  # a cluster's Ray, or a search recorded before this was
    now = _start_time(pid)
    if now is not None and record.get("driver_start") in (None, now):
        return []                                  # its driver still runs: not ours to stop
    left = [p for p in _session_processes(str(session)) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in left):
            time.sleep(0.05)
    return left


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None when it is gone: with
    the pid it names one process, even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _session_processes(session_dir: str) -> list[int]:
    """This user's processes that belong to the Ray session ``session_dir``: named in their command line (GCS,
    raylet, dashboard) or holding one of its files open (agents and workers: their logs)."""
    inside = session_dir.rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            if session_dir in cmdline or any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(inside)
                                             for fd in os.listdir(f"/proc/{entry}/fd")):
                found.append(int(entry))
        except OSError:                            # gone meanwhile, or not ours to read
            continue
    return found


# ---------------------------------------------------------------------------------------- Tune's state, cut short

def _whole(path: Path) -> bool:
    """Whether a state file reads to its end: JSON that parses, or a pickle whose opcodes reach STOP (not loaded;
    Tune pickles some of its ``.json`` files)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except ValueError:
        return False


def repair_tune_state(folder: Path, session_dir: str | None) -> list[str]:
    """Put back, from the killed driver's staging folder in its Ray session, every set of Tune state files in
    ``folder`` (Tune's experiment folder) that the kill cut short. Returns the files put back. A cut set with no
    whole copy is moved aside (``*.cut``) so Tune reads the newest whole one; when none is left, SearchFailedError:
    Tune would start the experiment again from nothing."""
    cut = {m["session"] for p in folder.glob("*-*") if (m := _STATE_FILE.match(p.name)) and not _whole(p)}
    if not cut:
        return []
    staged = sorted(Path(session_dir).glob(f"artifacts/*/{folder.name}/driver_artifacts"),
                    key=lambda p: p.stat().st_mtime) if session_dir else []
    restored: list[str] = []
    for session in sorted(cut):
        copies = [p for p in (staged[-1].iterdir() if staged else ())
                  if (m := _STATE_FILE.match(p.name)) and m["session"] == session]
        if copies and all(_whole(p) for p in copies):
            for p in copies:
                shutil.copyfile(p, folder / p.name)
                restored.append(p.name)
            continue
        for p in folder.glob(f"*-{session}.*"):
            if _STATE_FILE.match(p.name):
                p.rename(p.with_name(p.name + ".cut"))
    if not any(folder.glob("experiment_state-*.json")):
        raise SearchFailedError(f"--resume: Tune's experiment state in {folder} was cut short when the search was "
                                "killed, and no whole copy is left; start the search again without --resume")
    return restored


# ---------------------------------------------------------------------------------------- a trial's earlier attempts

def remove_temp_folders(trial_ids: list[str], keep: Path | None = None) -> None:
    """Delete this machine's temporary folders of these trials (``drcaps-<trial id>-*``), e.g. of a killed try;
    ``keep``: the running attempt's own."""
    for trial_id in trial_ids:
        for path in Path(tempfile.gettempdir()).glob(f"drcaps-{trial_id}-*"):
            if keep is None or path != keep:
                shutil.rmtree(path, ignore_errors=True)


def node_tags(resumed_from: Path | None) -> dict[str, str]:
    """Where this attempt of a trial runs (``drcaps.node``: host name, ``drcaps.node_ip``, ``drcaps.node_id``), and
    for a restarted trial the epoch its checkpoint held (``drcaps.resumed_from_epoch``)."""
    import socket

    import ray

    from drcapsnet.checkpoint import load_checkpoint

    ctx = ray.get_runtime_context()
    tags = {"drcaps.node": socket.gethostname(), "drcaps.node_ip": ray.util.get_node_ip_address(),
            "drcaps.node_id": ctx.get_node_id()}
    if resumed_from is not None:
        tags["drcaps.resumed_from_epoch"] = str(load_checkpoint(resumed_from)["epoch"])
    return tags


# ---------------------------------------------------------------------------------------- kill points, for tests

HOLD_ENV = "DRCAPS_HOLD_AT"   # tests only (tests/search/test_kill_points.py): "<point>:<trial number>:<epoch>:<folder>"
HOLD_S = 300.0


def hold(point: str, number: int | None, epoch: int = 0) -> None:
    """A kill point for the recovery tests: where ``$DRCAPS_HOLD_AT`` names this point of this trial (and epoch; 0:
    any), write ``<folder>/<point>-<number>-<epoch>`` and wait (300 s at most) for the test to kill the search
    driver. Points: ``started`` (the trial's MLflow run exists, nothing trained), ``logged`` (an epoch's metrics are
    in MLflow, its checkpoint not yet with Tune), ``uploaded`` (at the trial's end: the best weights are in MLflow,
    the run not yet ended). Unset (always, outside those tests): returns at once."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    want, trial, at, folder = (spec.split(":", 3) + ["", "", ""])[:4]
    if want != point or trial != str(number) or at not in ("0", str(epoch)):
        return
    Path(folder, f"{point}-{number}-{epoch}").touch()
    time.sleep(HOLD_S)
