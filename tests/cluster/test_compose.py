"""The project's own docker-compose.yml on a real Docker engine, as a user runs it (docs/cluster.md, README "On a
cluster"): the image built from this checkout, PostgreSQL, the MLflow server, a Ray head and 2 Ray workers. A search
from this machine through Ray Client and one from inside the stack; then a worker container killed while a trial
runs on it. Everything is read back from the servers themselves: MLflow over its REST API, the Optuna study from
PostgreSQL. The stack (containers, volumes, network) is removed whatever the outcome.

Needs a Docker engine, a compose command and the base images (`docker/ensure-docker.sh`, which `make test` runs,
installs and starts them where it can); without an engine every test here is skipped, saying so. About 10 minutes
on 2 cores once the image is built (first build: a few minutes more; later builds are cached by Docker).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DRCAPS = Path(sys.executable).parent / "drcaps"
IMAGE = "drcaps:latest"            # docker-compose.yml's default (DRCAPS_IMAGE)


def _run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and _run([*cmd, "version"], timeout=30).returncode == 0:
            return cmd
    return None


def _why_no_docker() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (install Docker, or run docker/ensure-docker.sh as root)"
    try:
        if _run(["docker", "info"], timeout=30).returncode != 0:
            return "no Docker engine answers `docker info` (start one: docker/ensure-docker.sh as root, or `make test`)"
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if _compose_command() is None:
        return "neither `docker compose` nor `docker-compose` works (install one: docker/ensure-docker.sh)"
    missing = [i for i in ("python:3.11-slim", "postgres:15") if _run(["docker", "image", "inspect", i]).returncode]
    if missing:
        return f"base images {missing} are missing and cannot be pulled here (build them: docker/build-base-images.sh)"
    return None


WHY = _why_no_docker()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"cluster tests need Docker: {WHY}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    compose: list[str]          # the compose command with project name, file and env file
    mlflow: str                 # http://127.0.0.1:PORT, the published MLflow server
    ray_client: str             # ray://127.0.0.1:PORT
    workdir: Path

    def run(self, *args: str, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run([*self.compose, *args], timeout=timeout, input=input)

    def head(self, *cmd: str, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "-T", "ray-head", *cmd, timeout=timeout, input=input)

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "-q", service, timeout=60).stdout.split()

    # MLflow's REST API, as any client sees the server
    def get(self, endpoint: str, /, **params: Any) -> dict[str, Any]:
        url = f"{self.mlflow}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.mlflow}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def runs(self, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
        exp_id = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        return self.post("runs/search", {"experiment_ids": [exp_id], "filter": filter_string,
                                         "max_results": 1000}).get("runs", [])

    def study(self, name: str) -> list[dict[str, Any]]:
        """The Optuna study's trials, read from PostgreSQL by the head (the same storage URL the search used)."""
        code = ("import json, os, optuna; optuna.logging.set_verbosity(optuna.logging.ERROR); "
                f"s = optuna.load_study(study_name={name!r}, storage=os.environ['DRCAPS_OPTUNA_STORAGE']); "
                "print(json.dumps([{'state': t.state.name, 'params': t.params, 'value': t.value} for t in s.trials]))")
        out = self.head("python", "-c", code, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    build = _run(["docker", "build", "--network", "host", "-t", IMAGE, str(REPO)], timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    workdir = tmp_path_factory.mktemp("compose")
    ports = {"MLFLOW_PORT": _free_port(), "RAY_CLIENT_PORT": _free_port(), "RAY_DASHBOARD_PORT": _free_port()}
    env_file = workdir / ".env"
    env_file.write_text(f"POSTGRES_PASSWORD={secrets.token_hex(16)}\nRAY_WORKER_CPUS=1\n"
                        + "".join(f"{k}={v}\n" for k, v in ports.items()))
    project = f"drcapstest{os.getpid()}{secrets.token_hex(3)}"
    compose = [*_compose_command(), "-p", project, "-f", str(REPO / "docker-compose.yml"), "--env-file", str(env_file)]
    s = Stack(compose, f"http://127.0.0.1:{ports['MLFLOW_PORT']}", f"ray://127.0.0.1:{ports['RAY_CLIENT_PORT']}",
              workdir)
    try:
        up = s.run("up", "-d", "--scale", "ray-worker=2", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 420    # `ray start` retries on a busy machine
        alive = 0
        while time.monotonic() < deadline:       # the head and both workers registered with Ray
            out = s.head("python", "-c", "import ray; ray.init('auto', logging_level='ERROR'); "
                                         "print(sum(n['Alive'] for n in ray.nodes()))", timeout=120)
            alive = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0
            if alive >= 3:
                break
            time.sleep(3)
        assert alive >= 3, f"only {alive} Ray nodes alive: {s.run('logs', '--tail', '30').stdout[-4000:]}"
        yield s
    finally:
        logs = s.run("logs", "--tail", "40", timeout=120)
        print(logs.stdout[-8000:])                            # shown when a test failed
        down = s.run("down", "-v", "--remove-orphans", "-t", "5", timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]


def _experiment(name: str, **search: Any) -> dict[str, Any]:
    return {"name": name, "model": {"preset": "tiny"},
            "data": {"dataset": "digits", "batch_size": 32, "limit_train": 400, "shift_pixels": 0},
            "train": {"epochs": 2, "device": "cpu", "optimizer": "adam", "lr": 3.0e-3},
            "search": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "resources": {"cpu": 1},
                       "scheduler": {"name": "none"}, "max_failures": 2,
                       "space": {"model.units": {"type": "categorical", "choices": [4, 8]},
                                 "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}}
            | search}


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DRCAPS_"))}
    return env | {"RAY_AUTH_MODE": "disabled"}   # the stack's Ray runs without tokens (ports on 127.0.0.1 only)


def _search_via_client(stack: Stack, name: str, exp: dict[str, Any]) -> subprocess.Popen[str]:
    (stack.workdir / f"{name}.yaml").write_text(yaml.safe_dump(exp))
    return subprocess.Popen([str(DRCAPS), "search", f"{name}.yaml", "--address", stack.ray_client],
                            cwd=stack.workdir, env=_client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=150)
        pytest.fail(f"the search did not end within {timeout} s: {out[-2000:]} {err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def _check_search(stack: Stack, name: str, n_trials: int, epochs: int) -> tuple[dict[str, Any], list[dict]]:
    """Parent FINISHED; one FINISHED child run per trial, each with its params, a metric point per epoch and its
    best checkpoint on the server; the Optuna study in PostgreSQL holds the same trials. Returns (parent, children)."""
    parents = stack.runs(name, "tags.`drcaps.role` = 'search'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    children = stack.runs(name, f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'")
    assert len(children) == n_trials
    assert len({tags(r)["drcaps.trial_id"] for r in children}) == n_trials       # one run per trial
    assert all(r["info"]["status"] == "FINISHED" for r in children), [r["info"]["status"] for r in children]
    for r in children:
        run_id = r["info"]["run_id"]
        assert {"model.units", "train.lr", "train.epochs"} <= params(r).keys()
        history = stack.get("metrics/get-history", run_id=run_id, metric_key="val_acc")["metrics"]
        assert sorted(m["step"] for m in history) == list(range(1, epochs + 1)), history
        listed = stack.get("artifacts/list", run_id=run_id, path="checkpoint").get("files", [])
        assert any(f["path"].endswith("best.pt") and int(f.get("file_size", 0)) > 0 for f in listed), listed
    study = stack.study(tags(parent)["drcaps.study_name"])
    assert sorted(t["state"] for t in study) == ["COMPLETE"] * n_trials
    mlflow_points = sorted((int(params(r)["model.units"]), round(float(params(r)["train.lr"]), 8)) for r in children)
    optuna_points = sorted((int(t["params"]["model.units"]), round(float(t["params"]["train.lr"]), 8)) for t in study)
    assert mlflow_points == optuna_points
    return parent, children


def _check_export(path: Path, parent: dict[str, Any], children: list[dict[str, Any]]) -> None:
    """The exported config is the best run's: its run id, its params, its best val_acc (the highest of all)."""
    exported = yaml.safe_load(path.read_text())
    best = max(children, key=lambda r: metrics(r)["best_val_acc"])
    assert exported["result"]["mlflow_run_id"] == best["info"]["run_id"] == tags(parent)["drcaps.best_run_id"]
    assert exported["model"]["units"] == int(params(best)["model.units"])
    assert exported["train"]["lr"] == pytest.approx(float(params(best)["train.lr"]))
    assert exported["result"]["metrics"]["val_acc"] == pytest.approx(metrics(best)["best_val_acc"])


def test_search_from_this_machine_and_from_inside_the_stack(stack):
    # From this machine through Ray Client: no tracking URI, storage or Optuna URL given, the head's are used.
    proc = _search_via_client(stack, "compose-client", _experiment("compose-client"))
    out, _ = _finish(proc)
    assert "exported best config" in out, out[-2000:]
    parent, children = _check_search(stack, "compose-client", n_trials=4, epochs=2)
    nodes = {tags(r)["drcaps.node"] for r in children}
    head = stack.head("hostname").stdout.strip()
    assert len(nodes) >= 2 and head not in nodes, (nodes, head)        # every worker got trials, the head none
    workers = {stack.run("exec", "-T", "--index", str(i), "ray-worker", "hostname").stdout.strip() for i in (1, 2)}
    assert nodes == workers, (nodes, workers)
    _check_export(stack.workdir / "compose-client.best.yaml", parent, children)

    # From inside the stack, as `docker compose exec ray-head drcaps search ...` in the README.
    exp = _experiment("compose-inside", num_samples=2)
    assert stack.head("sh", "-c", "cat > /work/compose-inside.yaml", input=yaml.safe_dump(exp)).returncode == 0
    inside = stack.head("drcaps", "search", "/work/compose-inside.yaml", "--address", "auto", timeout=600)
    assert inside.returncode == 0, inside.stdout[-3000:] + inside.stderr[-3000:]
    parent, children = _check_search(stack, "compose-inside", n_trials=2, epochs=2)
    exported = stack.head("cat", "/work/compose-inside.best.yaml")
    assert exported.returncode == 0, exported.stderr
    (stack.workdir / "inside.best.yaml").write_text(exported.stdout)
    _check_export(stack.workdir / "inside.best.yaml", parent, children)


def test_a_worker_killed_mid_trial_resumes_elsewhere_from_its_checkpoint(stack):
    epochs = 8
    exp = _experiment("compose-kill", num_samples=2)
    exp["train"]["epochs"] = epochs
    exp["data"]["limit_train"] = 1000                         # a few seconds per epoch: time to kill mid-trial
    proc = _search_via_client(stack, "compose-kill", exp)
    victim, victim_trial, deadline = None, None, time.monotonic() + 400
    try:
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                parents = stack.runs("compose-kill", "tags.`drcaps.role` = 'search'")
            except OSError:                    # experiment not created yet
                continue
            if not parents:
                continue
            for r in stack.runs("compose-kill", f"tags.mlflow.parentRunId = '{parents[0]['info']['run_id']}'"):
                m = metrics(r)
                if r["info"]["status"] == "RUNNING" and 1 <= m.get("epoch", 0) <= epochs - 3:
                    victim, victim_trial = tags(r)["drcaps.node"], tags(r)["drcaps.trial_id"]
                    break
        assert victim is not None, "no trial got past its first epoch in time"
        killed = _run(["docker", "kill", victim], timeout=60)      # the container's host name is its id
        assert killed.returncode == 0, killed.stderr
    except BaseException:
        proc.kill()
        raise
    out, _ = _finish(proc, timeout=600)
    parent, children = _check_search(stack, "compose-kill", n_trials=2, epochs=epochs)
    again = next(r for r in children if tags(r)["drcaps.trial_id"] == victim_trial)
    t = tags(again)
    assert t["drcaps.node"] != victim                              # finished on the surviving worker
    assert t.get("drcaps.restarts") == "1"                       # the same MLflow run, reopened once
    assert int(t["drcaps.resumed_from_epoch"]) >= 1              # from its checkpoint, not from epoch 0
    everything = stack.runs("compose-kill")
    assert not [r for r in everything if r["info"]["status"] == "RUNNING"]
    _check_export(stack.workdir / "compose-kill.best.yaml", parent, children)
