"""The search, unchanged, against a Ray cluster: a real `ray start --head` process on this machine that the search
joins by address, as `drcaps search --address HOST:PORT` does. The trials must run on that cluster's workers.

Ray >= 2.5x turns token authentication on for a head started where ``~/.ray/auth_token`` exists (any earlier
``ray.init()`` here wrote one), while a driver given an explicit address sends a token only under
``RAY_AUTH_MODE=token``. The head here runs with token authentication, as users' heads do: joined with the mode set,
the search runs; without it, ``drcaps search`` stops with exit code 2 and says what to export."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from search import tracking

RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, str]]:
    """A one-node Ray cluster in its own process group and temp dir; torn down with the group."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")            # short: Ray's unix sockets live under it
    subprocess.run([str(RAY), "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}   # ~/.ray/auth_token
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                             "--temp-dir", temp_dir, "--block"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:                           # GCS listening: the head is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "ray start exited"
            time.sleep(0.5)
        else:
            pytest.fail("ray start --head did not listen within 90 s")
        time.sleep(3)                                                # raylet registers after GCS
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=60,
                       env={**os.environ, "RAY_TMPDIR": temp_dir})


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


@pytest.mark.slow
def test_search_joins_a_running_cluster_by_address(ray_head, tmp_path):
    address, temp_dir = ray_head
    # As a user runs it, in a fresh process: with the token mode the error below names.
    proc, uri = _drcaps_search(tmp_path, address, _env_without_ray(RAY_AUTH_MODE="token"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = tracking.latest_search_run(uri, "cluster-e2e")
    assert parent is not None and parent.status == "FINISHED"
    children = tracking.child_runs(uri, parent.run_id)
    assert len(children) == 2 and all(r.status == "FINISHED" for r in children)
    # The trials' worker logs are in the head's temp dir: they ran on its node, not on a Ray of their own.
    assert any(Path(temp_dir).glob("session_*/logs/worker-*")), "no worker ran under the cluster's temp dir"


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_gets_one_clear_error_and_nothing_recorded(ray_head, tmp_path):
    address, _ = ray_head
    proc, uri = _drcaps_search(tmp_path, address, _env_without_ray())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert address in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Refused before any MLflow run or Ray folder was made.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
