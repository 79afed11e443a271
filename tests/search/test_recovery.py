"""Recovery, end to end with real Ray and real MLflow (SQLite in tmp_path), nothing mocked.

1. A trial whose Ray worker is SIGKILLed mid-training is restarted by Ray from its last checkpoint and keeps
   logging into the SAME MLflow child run (``drcaps.restarts`` = 1), without re-running the epochs it had saved.
2. A ``drcaps search`` stopped by Ctrl-C (SIGINT to its process group) exits 130, and ``drcaps search --resume``
   finishes the same search: same parent run, one child run per trial, the best config exported.
3. The driver SIGKILLed (its whole process group), then ``--resume`` (more kill points: test_kill_points.py).
4. The disk of Ray's results filling up during a search (a tmpfs mounted here, where root may): the search stops in
   one line naming the filesystem, finished trials recorded, and ``--resume`` finishes it once there is room.

Marked slow: each test starts Ray (about 10 s) and trains a few tiny models on 1 of the 2 shared cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from search import tracking
from search.experiment import experiment_from_dict
from search.state import STATE_FILE
from search.tune.diskspace import DiskWatch
from tests.searches import search_once

DRCAPS = Path(sys.executable).parent / "drcaps"
WORKER_TITLE = "ray::ImplicitFunc"      # setproctitle of a function trainable's actor; ".train" while in a step


def _experiment(tmp: Path, **search: object) -> object:
    raw = {
        "name": "crash",
        "model": {"preset": "tiny"},
        "data": {"dataset": "digits", "batch_size": 32, "limit_train": 300, "shift_pixels": 0},
        "train": {"epochs": 4, "device": "cpu", "optimizer": "adam", "lr": 3.0e-3},
        "search": {"num_samples": 1, "max_concurrent": 1, "seed": 0, "max_failures": 2, "resources": {"cpu": 1},
                   "scheduler": {"name": "none"},
                   "space": {"train.lr": {"type": "categorical", "choices": [3.0e-3]}}, **search},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "crash"},
    }
    return experiment_from_dict(raw, base_dir=tmp)


# ---------------------------------------------------------------- processes, through /proc (psutil is not a dependency)

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])      # after "(comm)": state, ppid, ...


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _ppid(pid)
        if pid == ancestor:
            return True
    return False


def _our_trial_workers() -> dict[int, str]:
    """Ray trial actors started by THIS process's Ray (driver -> raylet -> worker): never another session's."""
    me = os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and WORKER_TITLE in (cmd := _cmdline(int(entry))) and _descends_from(int(entry), me):
            found[int(entry)] = cmd
    return found


def _checkpoint_indexes(exp_dir: Path) -> list[int]:
    return sorted(int(p.name.rpartition("_")[2]) for p in exp_dir.glob("*/*/checkpoint_*") if p.is_dir())


# ---------------------------------------------------------------- 1. a crashed trial

@dataclass
class _Kill:
    pid: int | None = None
    title: str = ""
    checkpoints: list[int] = field(default_factory=list)   # Ray checkpoints on disk when the worker was killed
    error: str | None = None


def _kill_trial_worker(exp_dir: Path, kill: _Kill, done: threading.Event, timeout_s: float = 120.0) -> None:
    """SIGKILL the trial's worker once Ray holds the epoch-1 checkpoint (see the test for why we wait for two)."""
    deadline = time.monotonic() + timeout_s
    while not done.is_set() and time.monotonic() < deadline:
        indexes = _checkpoint_indexes(exp_dir)
        if indexes and max(indexes) >= 1:
            workers = _our_trial_workers()
            print(f"trial workers found: {workers}; checkpoints on disk: {indexes}")
            if len(workers) != 1:
                kill.error = f"expected exactly one trial worker to kill, found {workers}"
                return
            (kill.pid, kill.title), = workers.items()
            kill.checkpoints = indexes
            os.kill(kill.pid, signal.SIGKILL)
            print(f"SIGKILLed {kill.pid} ({kill.title})")
            return
        time.sleep(0.02)
    kill.error = f"no epoch-2 checkpoint under {exp_dir} within {timeout_s:.0f} s (or the search ended first)"


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint_in_the_same_mlflow_run(tmp_path):
    import ray

    exp = _experiment(tmp_path)
    kill, done = _Kill(), threading.Event()
    killer = threading.Thread(target=_kill_trial_worker, args=(tmp_path / "ray" / exp.name, kill, done), daemon=True)
    killer.start()
    try:
        result = search_once(exp, tmp_path)
    finally:
        done.set()
        killer.join(timeout=10)
        ray.shutdown()
    assert kill.error is None, kill.error
    assert kill.pid is not None and kill.title.startswith(WORKER_TITLE)
    assert max(kill.checkpoints) < exp.run.train.epochs - 1, f"killed too late, the trial had ended: {kill}"

    children = tracking.child_runs(result.tracking_uri, result.parent_run_id)
    assert len(children) == 1, [c.tags for c in children]                   # the restart found its run again
    child = children[0]
    assert child.tags["drcaps.trial_id"] == result.best.trial_id
    assert child.tags.get("drcaps.restarts") == "1", child.tags
    assert child.status == "FINISHED" and child.tags["drcaps.outcome"] == "finished"
    steps = [step for step, _ in tracking.metric_history(result.tracking_uri, child.run_id, "val_acc")]
    print(f"val_acc steps logged: {steps}")
    # The kill waited for checkpoint_000001 (epoch 2) on disk: the worker writes it inside tune.report of epoch 2,
    # which it reaches only after the driver has registered the epoch-1 checkpoint and asked for the next step.
    # (checkpoint_000000 alone is not enough: it is on disk before the driver knows of it, and a kill in between
    # restarts the trial from scratch.) So Ray restores epoch 1 or 2 and epoch 1 is never trained, nor logged, twice.
    # An epoch logged to MLflow after Ray's last registered checkpoint is trained again after the restart, and not
    # logged again (the restarted attempt skips every step its run holds: same config, same values).
    assert steps == [1, 2, 3, 4], steps
    assert result.best.epochs == 4 and result.best.outcome == "finished"


# ---------------------------------------------------------------- 2. an interrupted search, resumed by the CLI

EXPERIMENT_YAML = """\
name: resume-e2e
model: {{preset: tiny}}
data: {{dataset: digits, batch_size: 32, limit_train: 300, shift_pixels: 0}}
train: {{epochs: 2, device: cpu, optimizer: adam, lr: 3.0e-3}}
search:
  num_samples: 3
  max_concurrent: 1
  seed: 3
  scheduler: {{name: none}}
  resources: {{cpu: 1}}
  space:
    train.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{uri: "sqlite:///{db}", experiment: resume-e2e}}
"""


@dataclass
class _Interrupted:
    tmp: Path
    uri: str
    parent_id: str                 # the parent run while the first `drcaps search` ran
    finished_before_sigint: int    # FINISHED child runs when SIGINT was sent
    returncode: int                # of the interrupted `drcaps search`
    stderr: str = field(repr=False)
    parent_status: str             # right after the interrupted process exited
    exported_when_interrupted: bool
    resumed: subprocess.CompletedProcess[str] = field(repr=False)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _finished_children(uri: str, parent_id: str) -> int:
    try:
        return sum(r.status == "FINISHED" for r in tracking.child_runs(uri, parent_id))
    except Exception:             # SQLite busy while a trial writes: ask again on the next poll
        return 0


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> _Interrupted:
    tmp = tmp_path_factory.mktemp("resume")
    db = tmp / "mlflow.db"
    uri = f"sqlite:///{db}"
    (tmp / "exp.yaml").write_text(EXPERIMENT_YAML.format(db=db))
    cmd = [str(DRCAPS), "search", str(tmp / "exp.yaml"), "--storage-path", str(tmp / "ray")]
    state_file = tmp / "ray" / "resume-e2e" / STATE_FILE
    out, err = tmp / "first.out", tmp / "first.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=o, stderr=e, start_new_session=True)
    try:
        parent_id, finished, deadline = None, 0, time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            # Query MLflow only once the state file exists: the parent run (and so the DB's tables) exist by then,
            # and this process does not race the search to create the SQLite schema.
            if state_file.exists():
                parent = tracking.latest_search_run(uri, "resume-e2e")
                parent_id = parent.run_id if parent else None
                finished = _finished_children(uri, parent_id) if parent_id else 0
                if finished >= 1:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, f"the search ended before it was interrupted:\n{_tail(out)}\n{_tail(err)}"
        assert parent_id and finished >= 1, f"no finished trial within 150 s:\n{_tail(err)}"
        # What Ctrl-C in a terminal does: SIGINT to the whole foreground group. Ray starts its own processes (GCS,
        # raylet, and through it the trial workers) with SIGINT blocked, so only the driver reacts: Tune's handler
        # saves the experiment state, stops the trials and lets Tuner.fit() return; a second SIGINT would skip that.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            returncode = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"drcaps search did not exit within 90 s of SIGINT:\n{_tail(err)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    parent_status = tracking.latest_search_run(uri, "resume-e2e").status
    best_yaml = tmp / "resume-e2e.best.yaml"
    exported = best_yaml.exists()
    best_yaml.unlink(missing_ok=True)          # the resumed search must write its own
    print(f"interrupted search: exit code {returncode}, parent {parent_id} {parent_status}, "
          f"{finished} finished trial(s), exported best: {exported}\n{_tail(err, 1500)}")
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp, capture_output=True, text=True, timeout=300,
                             start_new_session=True)
    return _Interrupted(tmp, uri, parent_id, finished, returncode, err.read_text(errors="replace"), parent_status,
                        exported, resumed)


@pytest.mark.slow
def test_sigint_stops_the_search_with_exit_130_and_a_killed_parent_run(interrupted):
    """Ray Tune catches the first SIGINT itself (saves the experiment state, then ``Tuner.fit`` RETURNS); the
    search must still end as interrupted: exit 130 and the parent run KILLED, not a ranking, export or registered
    model built from a partial search."""
    it = interrupted
    assert it.returncode == 130, f"exit code {it.returncode}\n{it.stderr[-3000:]}"
    assert "interrupted" in it.stderr and "Traceback" not in it.stderr, it.stderr[-3000:]
    assert "--resume" in it.stderr                         # the user is told how to continue
    assert it.parent_status == "KILLED"
    assert not it.exported_when_interrupted


@pytest.mark.slow
def test_resume_finishes_the_same_search_with_one_run_per_trial(interrupted):
    it = interrupted
    assert it.resumed.returncode == 0, it.resumed.stderr[-3000:]
    parent = tracking.latest_search_run(it.uri, "resume-e2e")
    assert parent is not None and parent.run_id == it.parent_id and parent.status == "FINISHED"
    children = tracking.child_runs(it.uri, it.parent_id)
    trial_ids = [c.tags["drcaps.trial_id"] for c in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3, trial_ids   # no second run for the interrupted trial
    assert all(c.status == "FINISHED" for c in children), [(c.tags["drcaps.trial_id"], c.status) for c in children]
    assert parent.tags["drcaps.best_trial_id"] in trial_ids
    assert (it.tmp / "resume-e2e.best.yaml").exists()
    assert f"exported best config: {it.tmp / 'resume-e2e.best.yaml'}" in it.resumed.stdout


# ---------------------------------------------------------------- 3. the driver SIGKILLed, then --resume

KILLED_YAML = EXPERIMENT_YAML.replace("resume-e2e", "killed-e2e").replace("num_samples: 3", "num_samples: 4") \
    .replace("epochs: 2", "epochs: 3")


@pytest.mark.slow
def test_resume_after_the_driver_is_sigkilled_reconciles_optuna_mlflow_and_temp_folders(tmp_path):
    import tempfile

    import optuna

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    (tmp_path / "exp.yaml").write_text(KILLED_YAML.format(db=db))
    cmd = [str(DRCAPS), "search", str(tmp_path / "exp.yaml"), "--storage-path", str(tmp_path / "ray")]
    state_file = tmp_path / "ray" / "killed-e2e" / STATE_FILE
    err = tmp_path / "first.err"
    with err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=e, start_new_session=True)
    try:
        finished, deadline = 0, time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if state_file.exists():
                parent = tracking.latest_search_run(uri, "killed-e2e")
                finished = _finished_children(uri, parent.run_id) if parent else 0
                if finished >= 1:
                    time.sleep(3)                    # into the next trial's training
                    break
            time.sleep(0.5)
        assert proc.poll() is None and finished >= 1, f"no trial finished before the kill:\n{_tail(err)}"
        os.killpg(proc.pid, signal.SIGKILL)          # the driver and everything in its group, no clean-up at all
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    parent = tracking.latest_search_run(uri, "killed-e2e")
    before = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                               storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    print(f"optuna trials when the driver was killed: {[t.state.name for t in before.trials]}")
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    parent = tracking.latest_search_run(uri, "killed-e2e")
    assert parent.status == "FINISHED"
    study = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    print(f"optuna trials after resume: {states}")
    assert len(study.trials) == 4, states                                   # exactly num_samples
    assert not any(s in ("RUNNING", "WAITING") for s in states), states
    children = tracking.child_runs(uri, parent.run_id)
    assert all(c.status != "RUNNING" for c in children), [(c.tags["drcaps.trial_id"], c.status) for c in children]
    for child in children:                                                   # re-trained epochs logged once
        steps = [step for step, _ in tracking.metric_history(uri, child.run_id, "epoch")]
        assert len(steps) == len(set(steps)), (child.tags["drcaps.trial_id"], steps)
    leftovers = [p for c in children for p in Path(tempfile.gettempdir()).glob(f"drcaps-{c.tags['drcaps.trial_id']}-*")]
    assert leftovers == [], leftovers


# ---------------------------------------------------------------- 4. a disk that fills up during a search

DISK_YAML = KILLED_YAML.replace("killed-e2e", "disk-e2e")


def _fill(folder: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of ``folder``'s filesystem (another program filling the disk)."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    size = stat.f_bavail * stat.f_frsize - leave
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, size))
    return filler


@pytest.mark.slow
def test_a_disk_that_fills_during_a_search_stops_it_in_one_line_and_resume_continues(tmp_path):
    import optuna

    small = tmp_path / "small"
    small.mkdir()
    # 96 MiB: the tiny model's Ray checkpoints weigh ~5 MiB each, 2 kept per trial until the search ends.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(small)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 96 MiB tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        db = tmp_path / "mlflow.db"
        uri = f"sqlite:///{db}"
        (tmp_path / "exp.yaml").write_text(DISK_YAML.format(db=db))
        cmd = [str(DRCAPS), "search", str(tmp_path / "exp.yaml"), "--storage-path", str(small / "runs")]
        env = {**os.environ, "DRCAPS_MIN_FREE_MB": "8"}              # the up-front floor, under the tmpfs' size
        state_file = small / "runs" / "disk-e2e" / STATE_FILE
        err = tmp_path / "first.err"
        with err.open("w") as e:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=e,
                                    start_new_session=True)
        try:
            finished, deadline = 0, time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if state_file.exists():
                    parent = tracking.latest_search_run(uri, "disk-e2e")
                    finished = _finished_children(uri, parent.run_id) if parent else 0
                    if finished >= 1:
                        break
                time.sleep(0.2)
            assert proc.poll() is None and finished >= 1, f"no trial finished first:\n{_tail(err)}"
            # Another program fills the disk to just under what the search keeps free (the next checkpoints):
            # the search must stop before any write of its own fails.
            need = DiskWatch({}, small / "runs" / "disk-e2e" / parent.tags["drcaps.study_name"], 1).need()
            filler = _fill(small, leave=need - 2**20)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr = err.read_text()
        print(f"stopped: exit {returncode}\n{stderr[-1500:]}")
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert returncode == 1 and "Traceback" not in stderr and "Ctrl+C" not in stderr, stderr[-3000:]
        assert len(errors) == 1 and f"the filesystem of {small}" in errors[0] and "full:" in errors[0], errors
        assert "--resume" in errors[0], errors

        parent = tracking.latest_search_run(uri, "disk-e2e")
        assert parent.status == "KILLED"
        runs = tracking.child_runs(uri, parent.run_id)
        done = {r.tags["drcaps.trial_number"] for r in runs if r.status == "FINISHED"}
        assert len(done) >= finished, [(r.tags["drcaps.trial_number"], r.status) for r in runs]
        study = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                                  storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        complete = {str(t.number) for t in study.trials if t.state.name == "COMPLETE"}
        # Every trial Tune saw finish is recorded in both stores. A trial ends its MLflow run at its last epoch just
        # BEFORE its final report (search/tune/trial.py), so one the stop cut between the two is FINISHED in MLflow
        # and still RUNNING in Optuna: --resume reconciles it (asserted below).
        assert len(complete) >= finished and complete <= done, (done, [t.state.name for t in study.trials])

        filler.unlink()                                               # room again: the search continues
        resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=400, start_new_session=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        parent = tracking.latest_search_run(uri, "disk-e2e")
        assert parent.status == "FINISHED"
        runs = tracking.child_runs(uri, parent.run_id)
        assert sorted(r.tags["drcaps.trial_number"] for r in runs) == ["0", "1", "2", "3"], [r.tags for r in runs]
        assert all(r.status == "FINISHED" for r in runs), [(r.tags["drcaps.trial_number"], r.status) for r in runs]
        study = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                                  storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
