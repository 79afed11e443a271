"""The search, unchanged, against a Ray cluster: a real `ray start --head` process on this machine that the search
joins by address, as `drcaps search --address HOST:PORT` does. The trials must run on that cluster's workers.

Ray >= 2.5x turns token authentication on for a head started where ``~/.ray/auth_token`` exists (any earlier
``ray.init()`` here wrote one), while a driver given an explicit address sends a token only under
``RAY_AUTH_MODE=token``. The head here runs with token authentication, as users' heads do: joined with the mode set,
the search runs; without it, ``drcaps search`` stops with exit code 2 and says what to export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search import tracking
from tests.servers import free_port, mlflow_server

RAY = Path(sys.executable).parent / "ray"




@dataclass(frozen=True)
class Head:
    address: str           # HOST:PORT of the GCS, what `ray start --address` and `drcaps search --address` take
    client_address: str   # ray://HOST:PORT of its Ray Client server
    temp_dir: str
    store: Path            # the head's own MLflow store, Optuna storage and Ray storage (its environment names them)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A one-node Ray cluster (with a Ray Client server) in its own process group and temp dir."""
    port, client_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")            # short: Ray's unix sockets live under it
    subprocess.run([str(RAY), "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
    store = Path(tempfile.mkdtemp(prefix="drcaps-head-"))
    # As docker-compose.yml sets them on its nodes: what a search driven from a Ray Client uses on the head.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",   # ~/.ray/auth_token
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "DRCAPS_OPTUNA_STORAGE": f"sqlite:///{store / 'optuna.db'}", "DRCAPS_STORAGE_PATH": str(store / "ray")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--ray-client-server-port", str(client_port), "--num-cpus", "2", "--num-gpus", "0",
                             "--include-dashboard", "false",
                             "--temp-dir", temp_dir, "--block"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        # GCS listening (the head is up) AND the Ray Client server listening: it starts last, and a test that
        # connects through ray:// first found its port closed once ("Connection refused").
        for listening in (port, client_port):
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", listening)) == 0:
                        break
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else "ray start exited"
                time.sleep(0.5)
            else:
                pytest.fail(f"ray start --head did not listen on port {listening} within 90 s")
        time.sleep(3)                                                # raylet registers after GCS
        yield Head(f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}", temp_dir, store)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_leftovers(temp_dir)            # not `ray stop`: that stops every Ray on the machine, CI's own too
        shutil.rmtree(store, ignore_errors=True)


def _kill_leftovers(temp_dir: str) -> None:
    """SIGKILL any process of this cluster that outlived its group (their command lines name its temp dir)."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir in (proc_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


EXPERIMENT = {
    "name": "cluster-e2e",
    "model": {"preset": "tiny"},
    "data": {"dataset": "digits", "batch_size": 32, "limit_train": 200, "shift_pixels": 0},
    "train": {"epochs": 1, "device": "cpu", "optimizer": "adam", "lr": 3.0e-3},
    "search": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "resources": {"cpu": 1},
               "scheduler": {"name": "none"},
               "space": {"model.units": {"type": "categorical", "choices": [4, 8]}}},
}


def _drcaps_search(tmp_path: Path, address: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    db = tmp_path / "mlflow.db"
    (tmp_path / "exp.yaml").write_text(json.dumps({**EXPERIMENT, "tracking": {"uri": f"sqlite:///{db}"}}))
    proc = subprocess.run([str(Path(sys.executable).parent / "drcaps"), "search", str(tmp_path / "exp.yaml"),
                           "--address", address, "--storage-path", str(tmp_path / "ray")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, f"sqlite:///{db}"


def _env_without_ray(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def _assert_search_finished(proc: subprocess.CompletedProcess[str], uri: str) -> None:
    """Exit code 0, the parent run FINISHED, one FINISHED child run per trial."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = tracking.latest_search_run(uri, "cluster-e2e")
    assert parent is not None and parent.status == "FINISHED"
    children = tracking.child_runs(uri, parent.run_id)
    assert len(children) == 2 and all(r.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_search_joins_a_running_cluster_by_address(ray_head, tmp_path):
    # As a user runs it, in a fresh process: with the token mode the error below names.
    proc, uri = _drcaps_search(tmp_path, ray_head.address, _env_without_ray(RAY_AUTH_MODE="token"))
    _assert_search_finished(proc, uri)
    # The trials' worker logs are in the head's temp dir: they ran on its node, not on a Ray of their own.
    assert any(Path(ray_head.temp_dir).glob("session_*/logs/worker-*")), "no worker ran under the cluster's temp dir"


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_gets_one_clear_error_and_nothing_recorded(ray_head, tmp_path):
    address = ray_head.address
    proc, uri = _drcaps_search(tmp_path, address, _env_without_ray())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert address in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Refused before any MLflow run or Ray folder was made.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def _search_status(db: Path) -> list[str]:
    """The status of the search's parent runs, read in milliseconds (plain SQLite: opening MLflow's store takes
    seconds, time enough for a 2-trial search to end)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        return [row[0] for row in con.execute("SELECT status FROM runs WHERE run_uuid IN (SELECT run_uuid FROM tags "
                                              "WHERE key = 'drcaps.role' AND value = 'search')")]


@pytest.mark.slow
def test_search_through_ray_client_runs_its_driver_on_the_head(ray_head, tmp_path):
    """`--address ray://HOST:10001`: the whole driver runs as a task on the head, with the head's tracking URI,
    Optuna storage and Ray storage (its environment's); this side shows its progress as it goes (a trial's line
    arrives while the search still runs), then writes the exported files and the summary."""
    one_at_a_time = {**EXPERIMENT, "search": {**EXPERIMENT["search"], "max_concurrent": 1}}
    (tmp_path / "exp.yaml").write_text(json.dumps(one_at_a_time))          # no tracking URI: the head's
    uri = f"sqlite:///{ray_head.store / 'mlflow.db'}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "drcaps"), "search", str(tmp_path / "exp.yaml"),
                             "--address", ray_head.client_address], cwd=tmp_path,
                            env=_env_without_ray(RAY_AUTH_MODE="token"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, running_then = [], None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:                                  # live: the first trial's line, mid-search
            lines.append(line)
            if line.startswith("[1/2] trial ") and running_then is None:
                running_then = (proc.poll() is None, _search_status(ray_head.store / "mlflow.db"))
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = "".join(lines)
    assert running_then == (True, ["RUNNING"]), (running_then, out[-3000:], err[-3000:])
    _assert_search_finished(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), uri)
    parent = tracking.latest_search_run(uri, "cluster-e2e")
    assert (ray_head.store / "optuna.db").exists() and (ray_head.store / "ray" / "cluster-e2e").is_dir()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "drcaps-runs").exists()
    exported = (tmp_path / "cluster-e2e.best.yaml").read_text()       # written here, from the head's export
    assert parent.tags["drcaps.best_run_id"] in exported
    assert (tmp_path / "cluster-e2e.best.trials.csv").read_text().count("\n") == 3   # header + 2 trials
    assert f"exported best config: {tmp_path / 'cluster-e2e.best.yaml'}" in out, out[-2000:]
    assert out.index("[2/2] trial ") < out.index("exported best config"), out[-3000:]   # each line once, in order
    assert out.count("[1/2] trial ") == 1 and "Traceback" not in out + err, (out + err)[-3000:]
    children = tracking.child_runs(uri, parent.run_id)
    assert all(r.tags.get("drcaps.node") == socket.gethostname() for r in children)   # each trial says where


@pytest.mark.parametrize("flag", [["--tracking-uri", "sqlite:///{tmp}/mlflow.db"], ["--set", "search.storage=sqlite:///{tmp}/o.db"]])
def test_ray_client_refuses_a_sqlite_file_on_this_machine_before_connecting(tmp_path, flag):
    """Under ray:// a SQLite file named here is not on the head: one line, exit 2, before any connection (the
    address here answers nothing) and before anything is created."""
    (tmp_path / "exp.yaml").write_text(json.dumps(EXPERIMENT))
    args = [a.format(tmp=tmp_path) for a in flag]
    proc = subprocess.run([str(Path(sys.executable).parent / "drcaps"), "search", str(tmp_path / "exp.yaml"),
                           "--address", f"ray://127.0.0.1:{free_port()}", *args], cwd=tmp_path,
                          env=_env_without_ray(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "file on this machine" in lines[0] and "docker compose exec ray-head" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


@pytest.mark.slow
def test_a_tracking_server_that_refuses_the_host_name_is_one_line_before_any_run(tmp_path):
    """MLflow 3 answers API calls from a Host name outside --allowed-hosts with 403 "Invalid Host header" (its
    /health still answers): the check says which flag fixes it, exit 2, and no run is created."""
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, "--allowed-hosts", "mlflow.example",
                       "--artifacts-destination", str(tmp_path / "artifacts"), timeout_s=120) as uri:
        (tmp_path / "exp.yaml").write_text(json.dumps(EXPERIMENT))
        proc = subprocess.run([str(Path(sys.executable).parent / "drcaps"), "search", str(tmp_path / "exp.yaml"),
                               "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")], cwd=tmp_path,
                              env=_env_without_ray(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Invalid Host header" in lines[0], lines
        assert "--allowed-hosts 127.0.0.1,127.0.0.1:*" in lines[0], lines
        assert not (tmp_path / "ray").exists()
    from mlflow import MlflowClient  # read the server's store directly: no run was created
    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
