"""The project's own docker-compose.yml on a real Docker engine, as a user runs it (docs/cluster.md, README "On a
cluster"): the image built from this checkout, PostgreSQL, the MLflow server, a Ray head and 2 Ray workers, with the
secrets docker/make-env.sh writes (authentication on). Every published port refuses a client without credentials;
a search from this machine through Ray Client, one from inside the stack, one as a Ray Job (submitted, followed,
stopped, resumed); then a worker container killed while a trial runs on it. No secret appears in any output, export,
report or MLflow param/tag. Everything is read back from the servers themselves: MLflow over its REST API, the
Optuna study from PostgreSQL. The stack (containers, volumes, network) is removed whatever the outcome.

Needs a Docker engine, a compose command and the base images (`docker/ensure-docker.sh`, which `make test` runs,
installs and starts them where it can); without an engine every test here is skipped, saying so. About 10 minutes
on 2 cores once the image is built (first build: a few minutes more; later builds are cached by Docker).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
RAY = Path(sys.executable).parent / "ray"
IMAGE = "drcaps:latest"            # docker-compose.yml's default (DRCAPS_IMAGE)
SECRETS = ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "POSTGRES_PASSWORD",
           "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD")          # what docker/make-env.sh makes up


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
    dashboard: str              # http://127.0.0.1:PORT, Ray's dashboard and Jobs API
    workdir: Path
    secrets: dict[str, str]     # the .env docker/make-env.sh wrote

    @property
    def basic_auth(self) -> dict[str, str]:
        pair = f"{self.secrets['MLFLOW_TRACKING_USERNAME']}:{self.secrets['MLFLOW_TRACKING_PASSWORD']}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def client_env(self, **changes: str) -> dict[str, str]:
        """This machine's environment as docs/cluster.md sets it up: Ray's token (no MLflow credentials: through
        Ray Client and Ray Jobs the search talks to MLflow from the head)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DRCAPS_"))}
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.secrets["RAY_AUTH_TOKEN"]} | changes

    def job_status(self, job_id: str) -> str:
        """A Ray Job's status from the Jobs REST API (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED)."""
        req = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {self.secrets['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["status"]

    def ray(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        """The ray CLI of this machine against the published dashboard port (Ray Jobs)."""
        return _run([str(RAY), *args], timeout=timeout, env=self.client_env(**env), cwd=self.workdir)

    def run(self, *args: str, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run([*self.compose, *args], timeout=timeout, input=input)

    def head(self, *cmd: str, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "-T", "ray-head", *cmd, timeout=timeout, input=input)

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "-q", service, timeout=60).stdout.split()

    # MLflow's REST API, as any client sees the server
    def get(self, endpoint: str, /, **params: Any) -> dict[str, Any]:
        url = f"{self.mlflow}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(urllib.request.Request(url, headers=self.basic_auth), timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.mlflow}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"} | self.basic_auth)
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
    made = _run(["sh", str(REPO / "docker" / "make-env.sh"), str(env_file)], timeout=60)   # as docs/cluster.md
    assert made.returncode == 0, made.stderr
    with env_file.open("a") as f:
        f.write("RAY_WORKER_CPUS=1\n" + "".join(f"{k}={v}\n" for k, v in ports.items()))
    found = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and line[0] != "#")
    assert {*SECRETS, "MLFLOW_TRACKING_USERNAME"} <= found.keys(), found.keys()
    assert all(len(found[k]) >= 32 for k in SECRETS), "make-env.sh wrote a short secret"
    project = f"drcapstest{os.getpid()}{secrets.token_hex(3)}"
    compose = [*_compose_command(), "-p", project, "-f", str(REPO / "docker-compose.yml"), "--env-file", str(env_file)]
    s = Stack(compose, f"http://127.0.0.1:{ports['MLFLOW_PORT']}", f"ray://127.0.0.1:{ports['RAY_CLIENT_PORT']}",
              f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}", workdir, found)
    try:
        up = s.run("up", "-d", "--scale", "ray-worker=2", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 420    # `ray start` retries on a busy machine
        alive = 0
        while time.monotonic() < deadline:       # the head and both workers registered with Ray
            out = s.head("python", "-c", "import ray; ray.init('auto', logging_level='ERROR'); "
                                         "print('alive', sum(n['Alive'] for n in ray.nodes()))", timeout=120)
            # Ray may print other lines (a raylet that failed to start on a busy machine, and retries, reports it)
            alive = max([int(line.split()[1]) for line in out.stdout.splitlines()
                         if line.startswith("alive ") and line.split()[1].isdigit()] or [0])
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


def _search_via_client(stack: Stack, name: str, exp: dict[str, Any]) -> subprocess.Popen[str]:
    (stack.workdir / f"{name}.yaml").write_text(yaml.safe_dump(exp))
    return subprocess.Popen([str(DRCAPS), "search", f"{name}.yaml", "--address", stack.ray_client],
                            cwd=stack.workdir, env=stack.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def _finish_watching(proc: subprocess.Popen[str], first: str, look: Any, timeout: float = 600) -> tuple[str, str, Any]:
    """As :func:`_finish`, reading the output as it comes: ``look()`` when the first line starting with ``first``
    arrives (what was true while the search still ran)."""
    seen, lines, errors = None, [], []
    assert proc.stdout is not None and proc.stderr is not None
    timer = threading.Timer(timeout, proc.send_signal, (signal.SIGINT,))
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)   # never blocks it
    timer.start()
    reader.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if seen is None and line.startswith(first):
                seen = look()
        proc.wait(timeout=150)
        reader.join(timeout=30)
    finally:
        timer.cancel()
        proc.kill()
    out, err = "".join(lines), "".join(errors)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err, seen


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
    one_epoch = _experiment("compose-client")
    one_epoch["train"]["epochs"] = 1                       # what is checked here needs no second epoch
    proc = _search_via_client(stack, "compose-client", one_epoch)
    out, err, parent_then = _finish_watching(proc, "[1/4] trial ",
                                             lambda: [p["info"]["status"] for p in stack.runs(
                                                 "compose-client", "tags.`drcaps.role` = 'search'")])
    assert parent_then == ["RUNNING"], (parent_then, out[-3000:])      # the laptop saw a trial end mid-search
    assert "exported best config" in out, out[-2000:]
    assert "patch version" not in err and "Wrote the latest version" not in out + err, err[-3000:]  # no chatter
    parent, children = _check_search(stack, "compose-client", n_trials=4, epochs=1)
    _assert_no_secret(stack, "compose-client", {"client stdout": out, "client stderr": err})
    # The summary's links are the published address, not the compose network's name; no MLflow chatter.
    assert f"{stack.mlflow}/#/experiments/" in out, out[-2000:]
    assert "mlflow:5000" not in out + err and "View run" not in out + err, (out + err)[-3000:]
    nodes = {tags(r)["drcaps.node"] for r in children}
    head = stack.head("hostname").stdout.strip()
    assert len(nodes) >= 2 and head not in nodes, (nodes, head)        # every worker got trials, the head none
    workers = {stack.run("exec", "-T", "--index", str(i), "ray-worker", "hostname").stdout.strip() for i in (1, 2)}
    assert nodes == workers, (nodes, workers)
    _check_export(stack.workdir / "compose-client.best.yaml", parent, children)

    # From inside the stack, as `docker compose exec ray-head drcaps search ...` in the README.
    exp = _experiment("compose-inside", num_samples=2)
    exp["train"]["epochs"] = 1
    assert stack.head("sh", "-c", "cat > /work/compose-inside.yaml", input=yaml.safe_dump(exp)).returncode == 0
    inside = stack.head("drcaps", "search", "/work/compose-inside.yaml", "--address", "auto", timeout=600)
    assert inside.returncode == 0, inside.stdout[-3000:] + inside.stderr[-3000:]
    parent, children = _check_search(stack, "compose-inside", n_trials=2, epochs=1)
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


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _texts_on_the_server(stack: Stack, experiment: str) -> dict[str, str]:
    """Every run's params and tags, and the parent runs' small text artifacts (the report, the export, ...)."""
    texts = {}
    for r in stack.runs(experiment):
        run_id = r["info"]["run_id"]
        texts[f"run {run_id} params/tags"] = json.dumps(r["data"])
        if tags(r).get("drcaps.role") != "search":
            continue
        for f in stack.get("artifacts/list", run_id=run_id).get("files", []):
            if not f.get("is_dir") and f["path"].endswith((".html", ".yaml", ".json", ".csv", ".txt", ".md")):
                url = f"{stack.mlflow}/get-artifact?" + urllib.parse.urlencode({"path": f["path"], "run_uuid": run_id})
                with urllib.request.urlopen(urllib.request.Request(url, headers=stack.basic_auth), timeout=60) as a:
                    texts[f"run {run_id} artifact {f['path']}"] = a.read().decode(errors="replace")
    return texts


def _assert_no_secret(stack: Stack, experiment: str, outputs: dict[str, str]) -> None:
    """No secret of .env in what the search printed, the files it wrote here, nor on the MLflow server."""
    texts = dict(outputs) | _texts_on_the_server(stack, experiment)
    texts |= {p.name: p.read_text(errors="replace") for p in stack.workdir.iterdir()
              if p.is_file() and p.name != ".env"}
    assert len(texts) > len(outputs)
    leaks = [f"{where}: {key}" for where, text in texts.items() for key in SECRETS if stack.secrets[key] in text]
    assert not leaks, leaks


def test_every_published_port_refuses_a_client_without_credentials(stack):
    # MLflow (REST API and UI): basic auth; a wrong password is refused the same way.
    api = f"{stack.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong-password").decode()}
    assert (_status(api), _status(f"{stack.mlflow}/"), _status(api, wrong)) == (401, 401, 401)
    assert _status(api, stack.basic_auth) == 200
    # Ray's dashboard and Jobs REST API: a bearer token.
    jobs = f"{stack.dashboard}/api/jobs/"
    assert _status(jobs) in (401, 403)
    assert _status(jobs, {"Authorization": "Bearer " + "0" * 64}) in (401, 403)
    assert _status(jobs, {"Authorization": f"Bearer {stack.secrets['RAY_AUTH_TOKEN']}"}) == 200
    listed = stack.ray("job", "list", "--address", stack.dashboard, RAY_AUTH_TOKEN="0" * 64)
    assert listed.returncode != 0
    # Ray Client and Ray Jobs (--submit): a wrong token or none is one line naming what to set, exit code 2, before
    # anything is created on the cluster; below, an unknown job id to follow is one line too.
    (stack.workdir / "compose-noauth.yaml").write_text(yaml.safe_dump(_experiment("compose-noauth")))
    for flag, address in (("--address", stack.ray_client), ("--submit", stack.dashboard)):
        for env in ({"RAY_AUTH_TOKEN": "0" * 64}, {"RAY_AUTH_MODE": "disabled"}):
            proc = _run([str(DRCAPS), "search", "compose-noauth.yaml", flag, address], timeout=300,
                        cwd=stack.workdir, env=stack.client_env(**env))
            assert proc.returncode == 2, (flag, env, proc.stdout[-2000:], proc.stderr[-3000:])
            assert proc.stderr.startswith(f"error: {flag}:") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
            assert "RAY_AUTH_TOKEN" in proc.stderr and stack.secrets["RAY_AUTH_TOKEN"] not in proc.stderr
    unknown = _run([str(DRCAPS), "follow", "drcaps-nothing-000000", "--address", stack.dashboard], timeout=300,
                   cwd=stack.workdir, env=stack.client_env())
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr[-3000:]
    assert unknown.stderr.startswith("error: JOB_ID: no job 'drcaps-nothing-000000'"), unknown.stderr
    listed = stack.ray("job", "list", "--address", stack.dashboard)
    assert listed.returncode == 0 and "drcaps-compose-noauth" not in listed.stdout, listed.stdout[-2000:]  # none
    # The MLflow login, checked by drcaps before any run: none, or a wrong password (inside the stack).
    exp = yaml.safe_dump(_experiment("compose-noauth"))
    assert stack.head("sh", "-c", "cat > /work/compose-noauth.yaml", input=exp).returncode == 0
    for env, says in ((["MLFLOW_TRACKING_USERNAME=", "MLFLOW_TRACKING_PASSWORD="], "requires a login"),
                      (["MLFLOW_TRACKING_PASSWORD=wrong-password"], "refused the login of user 'admin'")):
        proc = stack.run("exec", "-T", *(f for e in env for f in ("-e", e)), "ray-head", "drcaps", "search",
                         "/work/compose-noauth.yaml", "--address", "auto", timeout=300)
        assert proc.returncode == 2, (env, proc.stdout[-2000:], proc.stderr[-3000:])
        assert proc.stderr.startswith("error: tracking.uri:") and says in proc.stderr, proc.stderr[-3000:]
        assert "MLFLOW_TRACKING_PASSWORD" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert _status(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=compose-noauth",
                   stack.basic_auth) == 404


def test_a_search_as_a_ray_job_followed_stopped_and_resumed(stack):
    """As docs/cluster.md: `drcaps search --submit` from this machine (the file travels with the job), `drcaps
    follow` shows the trial lines as they end, `ray job stop` stops it as Ctrl-C does (parent run KILLED, follow
    exits 130), and `drcaps search --submit --resume` finishes it, followed to SUCCEEDED (exit 0)."""
    name, epochs = "compose-job", 3
    exp = _experiment(name, num_samples=3)
    exp["train"]["epochs"] = epochs
    exp["data"]["limit_train"] = 1000                       # a few seconds per epoch: time to stop mid-search
    (stack.workdir / f"{name}.yaml").write_text(yaml.safe_dump(exp))

    def submit(*flags: str) -> tuple[str, str]:
        sub = _run([str(DRCAPS), "search", f"{name}.yaml", "--submit", stack.dashboard, *flags], timeout=300,
                   cwd=stack.workdir, env=stack.client_env())
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
        job = sub.stdout.split(":", 1)[0].removeprefix("submitted ")
        assert job.startswith(f"drcaps-{name}-") and f"ray job stop --address {stack.dashboard} {job}" in sub.stdout
        return job, sub.stdout + sub.stderr

    def follow(job: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(DRCAPS), "follow", job, "--address", stack.dashboard], cwd=stack.workdir,
                                env=stack.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first, submitted = submit()
    following, followed, deadline = follow(first), [submitted], time.monotonic() + 500
    try:
        assert following.stdout is not None
        for line in following.stdout:                        # live: the first trial's line, while others run
            followed.append(line)
            if line.startswith("[1/3] trial ") or time.monotonic() > deadline:
                break
        assert any(x.startswith("[1/3] trial ") for x in followed), "".join(followed)[-3000:]
        stop = stack.ray("job", "stop", "--address", stack.dashboard, first, timeout=300)
        assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
        rest, _ = following.communicate(timeout=180)
    finally:
        following.kill()
    followed.append(rest)
    log = "".join(followed)
    assert stack.job_status(first) == "STOPPED" and following.returncode == 130, log[-3000:]
    assert "interrupted" in log and "Traceback" not in log, log[-3000:]
    assert f"drcaps search {name}.yaml --submit {stack.dashboard} --resume" in log, log[-3000:]   # how to go on
    parents = stack.runs(name, "tags.`drcaps.role` = 'search'")
    assert [p["info"]["status"] for p in parents] == ["KILLED"], log[-3000:]
    assert len([t for t in stack.study(tags(parents[0])["drcaps.study_name"]) if t["state"] == "COMPLETE"]) < 3

    second, submitted = submit("--resume")
    following = follow(second)
    out, _ = following.communicate(timeout=900)
    assert following.returncode == 0 and stack.job_status(second) == "SUCCEEDED", out[-3000:]
    assert "exported best config" in out, out[-3000:]
    assert f"{stack.mlflow}/#/experiments/" in out and "mlflow:5000" not in out   # published links
    parent, children = _check_search(stack, name, n_trials=3, epochs=epochs)
    exported = stack.head("cat", f"/work/{name}.best.yaml")            # where the job wrote it (the head's /work)
    assert exported.returncode == 0, exported.stderr
    (stack.workdir / f"{name}.best.yaml").write_text(exported.stdout)
    _check_export(stack.workdir / f"{name}.best.yaml", parent, children)
    _assert_no_secret(stack, name, {"job 1": log, "job 2": submitted + out})
    # A search the head refuses (its storage folder cannot be written there): the job FAILED, follow exits 1.
    bad, _ = submit("--storage-path", "/proc/drcaps")
    failed = follow(bad)
    told, _ = failed.communicate(timeout=300)
    assert failed.returncode == 1 and stack.job_status(bad) == "FAILED", told[-3000:]
    assert "error: --storage-path:" in told and "FAILED: drcaps search exited with code 2" in told, told[-3000:]
