"""The search driver SIGKILLed at several moments, then ``drcaps search --resume``: a table of kill points, real
Ray, Optuna and MLflow (SQLite in tmp_path), the CLI as a user runs it.

Each case asserts, after the resume: one MLflow run per trial (found again by its Optuna trial number even when Ray
brings the trial back under a new trial id), each with its best weights; no metric step logged twice; the Optuna
study reconciled (exactly num_samples trials, none RUNNING or WAITING, each epoch once); nothing left running of
the killed search's own Ray; a clean terminal (no traceback, no warning, no trial shown without its value).

How each moment is reached: a trial's moments by ``DRCAPS_HOLD_AT`` (search/tune/runtime.py ``hold``: the trial
writes a marker and waits there; the test kills the driver when the marker appears); the experiment state by
polling Tune's ``experiment_state-*.json`` every 2 ms and killing the driver when it changes (within a few ms of
Tune's write and the searcher's and callbacks' state written beside it). Marked slow: 1.8 min a case at a load
average of 8-10 on 2 cores, 3 min at 15-20 (not timed on an idle machine). Below them, fast tests of the pieces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from search import tracking
from search.state import STATE_FILE

DRCAPS = Path(sys.executable).parent / "drcaps"
NAME, TRIALS, EPOCHS = "kp", 3, 3
EXPERIMENT = f"""\
name: {NAME}
model: {{preset: tiny}}
data: {{dataset: digits, batch_size: 32, limit_train: 200, shift_pixels: 0}}
train: {{epochs: {EPOCHS}, device: cpu, optimizer: adam, lr: 3.0e-3}}
search:
  num_samples: {TRIALS}
  max_concurrent: {{concurrent}}
  seed: 3
  scheduler: {{name: none}}
  resources: {{cpu: 1}}
  space:
    train.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{uri: "sqlite:///{{db}}", experiment: {NAME}}}
"""


@dataclass(frozen=True)
class KillPoint:
    name: str
    hold: str | None              # DRCAPS_HOLD_AT without its folder: "<point>:<trial number>:<epoch>"
    how: str
    concurrent: int = 2
    new_trial_id: bool = False    # the kill comes before Tune saves the held trial: Ray brings it back anew


KILL_POINTS = [
    KillPoint("a-trial-tune-has-not-saved", "started:1:0",
              "trial 1 just started, alone, after trial 0 ended (Tune saves its state every >= 10 s, and on every "
              "2nd checkpoint of a trial): the resumed Tune asks for it again", concurrent=1, new_trial_id=True),
    KillPoint("before-the-first-checkpoint", "started:1:0",
              "trial 1's MLflow run exists and nothing is trained (trial 0 runs beside it)"),
    KillPoint("between-metrics-and-checkpoint", "logged:1:2",
              "trial 1's epoch 2 is in MLflow, its checkpoint not yet handed to Tune"),
    KillPoint("during-the-upload-at-the-end", "uploaded:0:0",
              "trial 0 ran its 3 epochs, its best weights are in MLflow, its run not yet ended"),
    KillPoint("while-the-experiment-state-is-written", None,
              "Tune's experiment_state-*.json changed for the second time (trials run)"),
]


# ---------------------------------------------------------------- processes, through /proc

def _session_processes(session_dir: str) -> list[int]:
    """Processes of the Ray session ``session_dir``: named in their command line or holding one of its files."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (session_dir in cmdline or any(f.startswith(session_dir + "/") for f in fds)):
            found.append(int(entry))
    return found


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes().rstrip(bytes(1))[:60].decode()}")
        except OSError:
            out.append(f"{pid} (gone)")
    return out


# ---------------------------------------------------------------- one case: run, kill, resume

@dataclass
class Outcome:
    tmp: Path
    uri: str
    killed_session: str           # the Ray session folder of the killed driver
    left_at_kill: list[int]       # its processes still running right after the kill
    resumed: subprocess.CompletedProcess[str]


def _wait_for_state_change(folder: Path, proc: subprocess.Popen[bytes], deadline: float, changes: int) -> bool:
    seen: list[tuple[int, int]] = []
    while time.monotonic() < deadline and proc.poll() is None:
        files = sorted(folder.glob("*/experiment_state-*.json"))
        if files:
            try:
                st = files[-1].stat()
            except OSError:
                continue
            if not seen or seen[-1] != (st.st_mtime_ns, st.st_size):
                seen.append((st.st_mtime_ns, st.st_size))
                if len(seen) > changes:
                    return True
        time.sleep(0.002)
    return False


def _wait_for_marker(holds: Path, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        if any(holds.iterdir()):
            return True
        time.sleep(0.05)
    return False


def _kill_and_resume(tmp: Path, point: KillPoint) -> Outcome:
    db = tmp / "mlflow.db"
    (tmp / "exp.yaml").write_text(EXPERIMENT.replace("{db}", str(db)).replace("{concurrent}", str(point.concurrent)))
    holds = tmp / "holds"
    holds.mkdir()
    env = {**os.environ, **({"DRCAPS_HOLD_AT": f"{point.hold}:{holds}"} if point.hold else {})}
    cmd = [str(DRCAPS), "search", str(tmp / "exp.yaml"), "--storage-path", str(tmp / "ray")]
    err = tmp / "first.err"
    with err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=e, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        reached = _wait_for_marker(holds, proc, deadline) if point.hold else \
            _wait_for_state_change(tmp / "ray" / NAME, proc, deadline, changes=2)
        assert reached, f"{point.name}: not reached ({point.how}):\n{err.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)             # the driver only: its Ray is left to fend for itself
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    import json

    record = json.loads((tmp / "ray" / NAME / STATE_FILE).read_text())
    session = record["ray_session_dir"]
    time.sleep(1.0)                                   # what dies with the driver has died by now
    left = _session_processes(session)
    print(f"{point.name}: killed; left running of its Ray: {_describe(left)}")
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp, capture_output=True, text=True, timeout=400,
                             start_new_session=True)
    return Outcome(tmp, f"sqlite:///{db}", session, left, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.name for p in KILL_POINTS])
def test_a_search_killed_at_any_moment_resumes_into_one_clean_record(tmp_path: Path, point: KillPoint) -> None:
    import optuna
    from mlflow import MlflowClient

    it = _kill_and_resume(tmp_path, point)
    out, err = it.resumed.stdout, it.resumed.stderr
    assert it.resumed.returncode == 0, f"{point.name}: resume exit {it.resumed.returncode}\n{err[-4000:]}"
    for text in ("Traceback", "Warning", "Error handling checkpoint"):
        if text in err + out:
            pytest.fail(f"{point.name}: {text!r} in the resumed search's output:\n{err[-6000:]}")
    assert f"{'val_acc'} -" not in out, out

    # One MLflow run per trial, each finished, with its best weights and every metric step once.
    parent = tracking.latest_search_run(it.uri, NAME)
    assert parent is not None and parent.status == "FINISHED"
    runs = tracking.child_runs(it.uri, parent.run_id)
    numbers = sorted(r.tags.get("drcaps.trial_number", "?") for r in runs)
    assert numbers == [str(n) for n in range(TRIALS)], [(r.run_id, r.tags.get("drcaps.trial_number"), r.status)
                                                        for r in runs]
    client = MlflowClient(it.uri)
    print(f"{point.name}: " + "; ".join(f"trial {r.tags['drcaps.trial_number']} restarts "
                                        f"{r.tags.get('drcaps.restarts', 0)} earlier ids "
                                        f"{r.tags.get('drcaps.earlier_trial_ids', '-')}" for r in runs))
    if point.new_trial_id:                  # the trial came back under a new Ray trial id, into its own run
        assert any(r.tags.get("drcaps.earlier_trial_ids") for r in runs), [r.tags for r in runs]
    for r in runs:
        assert r.status == "FINISHED" and r.tags.get("drcaps.outcome") == "finished", (r.tags, r.status)
        for key in r.metrics:
            steps = [m.step for m in client.get_metric_history(r.run_id, key)]
            assert len(steps) == len(set(steps)), (point.name, r.tags["drcaps.trial_number"], key, steps)
        epochs = sorted(m.step for m in client.get_metric_history(r.run_id, "epoch"))
        assert epochs == list(range(1, EPOCHS + 1)), epochs
        assert "checkpoint/best.pt" in [a.path for a in client.list_artifacts(r.run_id, "checkpoint")], r.tags

    # The Optuna study reconciled: exactly num_samples trials, all complete, each epoch reported once.
    study = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS, [t.state.name for t in study.trials]
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in study.trials)

    # Nothing of the killed search's Ray is left running.
    still = _session_processes(it.killed_session)
    assert still == [], f"{point.name}: left from the killed search: {_describe(still)}"


# ---------------------------------------------------------------- the pieces, fast: real files, real processes

def test_a_tune_state_cut_by_the_kill_is_put_back_from_the_staging_copy(tmp_path: Path) -> None:
    import pickle

    from search.tune import recovery

    folder, session = tmp_path / "runs" / "kp-1", tmp_path / "session"
    staged = session / "artifacts" / "2026-12-06_22-00-00" / folder.name / "driver_artifacts"
    folder.mkdir(parents=True)
    staged.mkdir(parents=True)
    whole = {"experiment_state-2026-12-06_22-00-00.json": b'{"trial_data": []}',
             "searcher-state-2026-12-06_22-00-00.pkl": pickle.dumps({"_live": {}})}
    for name, data in whole.items():
        (staged / name).write_bytes(data)
        (folder / name).write_bytes(data[: len(data) // 2])       # the copy cut short by the kill
    assert sorted(recovery.repair_tune_state(folder, str(session))) == sorted(whole)
    assert {name: (folder / name).read_bytes() for name in whole} == whole
    assert recovery.repair_tune_state(folder, str(session)) == []  # whole now: nothing to do


def test_a_cut_tune_state_without_a_copy_is_set_aside_or_refused(tmp_path: Path) -> None:
    from search.errors import SearchFailedError
    from search.tune import recovery

    folder = tmp_path / "kp-1"
    folder.mkdir()
    (folder / "experiment_state-2026-12-06_22-00-00.json").write_text('{"trial_data": []}')   # an earlier resume's
    (folder / "experiment_state-2026-12-06_23-00-00.json").write_text("")                     # cut, no copy
    assert recovery.repair_tune_state(folder, None) == []
    assert sorted(p.name for p in folder.iterdir()) == ["experiment_state-2026-12-06_22-00-00.json",
                                                        "experiment_state-2026-12-06_23-00-00.json.cut"]
    (folder / "experiment_state-2026-12-06_22-00-00.json").write_text('{"trial')
    with pytest.raises(SearchFailedError, match="cut short when the search was killed"):
        recovery.repair_tune_state(folder, str(tmp_path / "no-such-session"))


def test_leftovers_of_a_dead_driver_are_stopped_and_nothing_else(tmp_path: Path) -> None:
    from search.tune import recovery

    session, other = tmp_path / "session_a", tmp_path / "session_b"
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(120)"]
    ours = subprocess.Popen([*sleeper, str(session)])                # the session folder in its command line
    theirs = subprocess.Popen([*sleeper, str(other)])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        alive = {"ray_session_dir": str(session), "driver_pid": os.getpid(),
                 "driver_start": recovery._start_time(os.getpid())}
        assert recovery.stop_leftovers(alive) == []                   # its driver runs: not ours to stop
        assert recovery.stop_leftovers({}) == []                      # a cluster's Ray: nothing recorded
        gone = {"ray_session_dir": str(session), "driver_pid": dead.pid, "driver_start": 1}
        assert recovery.stop_leftovers(gone) == [ours.pid]
        assert ours.wait(timeout=10) is not None and theirs.poll() is None
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


def test_a_hold_waits_only_where_the_variable_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.tune import recovery

    monkeypatch.setattr(recovery, "HOLD_S", 0.0)
    monkeypatch.setenv(recovery.HOLD_ENV, f"logged:1:2:{tmp_path}")
    for point, number, epoch in (("logged", 1, 1), ("logged", 0, 2), ("started", 1, 2)):
        recovery.hold(point, number, epoch)
    assert list(tmp_path.iterdir()) == []
    recovery.hold("logged", 1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["logged-1-2"]
