"""``drcaps search --submit`` and ``drcaps follow`` (search/commands/jobs.py): a search as a Ray Job.

Fast: every bad input that needs no cluster, through ``drcaps`` itself (``cli.main``): exit code 2, ONE ``error:``
line naming the flag and the fix, nothing submitted; and the job's shell command run by a real ``sh``.
Slow: a real Ray head on this machine with its Jobs API (dashboard) and token authentication, in its own process
group and private temp dir (so no other ``ray.init()`` here finds it); a tiny search submitted, followed to
SUCCEEDED, an unknown job id and a wrong token refused; the head stopped by its own process ids, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from search.cli import main
from search.commands.jobs import EXPERIMENT_ENV, entrypoint, job_argv
from tests.conftest import TINY_EXPERIMENT, closed_port

BIN = Path(sys.executable).parent
RAY_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture()
def experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in RAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(TINY_EXPERIMENT)
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    assert "submitted" not in out, out
    return lines[0]


def test_submit_without_a_cluster_names_the_address_and_how_to_start_one(experiment, capsys):
    address = f"http://127.0.0.1:{closed_port()}"
    assert main(["search", str(experiment), "--submit", address]) == 2
    _one_error_line(capsys, "--submit:", address, "start the cluster", "--submit http://HOST:8265")


def test_submit_reads_its_default_address_as_ray_job_does(experiment, capsys, monkeypatch):
    address = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", address)
    assert main(["search", str(experiment), "--submit"]) == 2
    _one_error_line(capsys, "--submit:", address)


def test_submit_to_a_server_that_is_not_a_jobs_api(experiment, capsys):
    class NotRay(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["search", str(experiment), "--submit", address]) == 2
        _one_error_line(capsys, "--submit:", f"no Ray Jobs API answers at {address}")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("args", "needles"), [
    (["--address", "auto"], ("--submit: not with --address", "leave --address out")),
    (["--address", "ray://127.0.0.1:10001"], ("--submit: not with --address",)),
    (["--set", "train.lrr=0.1"], ("train.lrr", "did you mean")),          # the file first: nothing contacted
])
def test_submit_refuses_before_contacting_anything(experiment, capsys, args, needles):
    assert main(["search", str(experiment), "--submit", f"http://127.0.0.1:{closed_port()}", *args]) == 2
    _one_error_line(capsys, *needles)


@pytest.mark.parametrize("address", ["127.0.0.1:8265", "ray://127.0.0.1:10001", "exp.yaml", "http://"])
def test_an_address_that_is_not_a_jobs_api_url(experiment, capsys, address):
    assert main(["search", str(experiment), "--submit", address]) == 2
    _one_error_line(capsys, "--submit:", "http://HOST:8265")
    assert main(["follow", "drcaps-x-123456", "--address", address]) == 2
    _one_error_line(capsys, "--address:", "http://HOST:8265")


def test_follow_without_a_cluster(experiment, capsys):
    address = f"http://127.0.0.1:{closed_port()}"
    assert main(["follow", "drcaps-x-123456", "--address", address]) == 2
    _one_error_line(capsys, "--address:", address, "start the cluster")


def test_the_jobs_shell_command_writes_the_file_and_keeps_every_argument_whole(tmp_path):
    """The entrypoint under a real ``sh``, as Ray's job supervisor runs it (shell=True), with ``drcaps`` on PATH
    standing in for the search: it prints its arguments, one a line."""
    text = TINY_EXPERIMENT + "# a comment with 'quotes', \"double\", $HOME and `backticks`\n"
    overrides = ["train.lr=3.0e-3", "search.space.train.lr.high=0.1 # not a comment", "name='odd name'"]
    argv = job_argv(Path("/laptop/my exp.yaml"), overrides, {"storage_path": Path("/runs/a b"), "resume": True,
                                                             "smoke_test": True, "verbose": 2, "extend": None})
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "drcaps").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (fake / "drcaps").chmod(0o755)
    head = tmp_path / "head"
    head.mkdir()
    env = {"PATH": f"{fake}:/usr/bin:/bin", EXPERIMENT_ENV: text}
    done = subprocess.run(entrypoint("drcaps-exp-abc123", argv), shell=True, cwd=head, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    written = head / "drcaps-jobs" / "drcaps-exp-abc123" / "my exp.yaml"
    assert written.read_text() == text
    assert done.stdout.splitlines() == [
        "search", "drcaps-jobs/drcaps-exp-abc123/my exp.yaml", "--address", "auto",
        "--set", overrides[0], "--set", overrides[1], "--set", overrides[2],
        "--storage-path", "/runs/a b", "--resume", "--smoke-test", "-v", "-v"]


# --- a real Ray head with its Jobs API ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    api: str            # http://127.0.0.1:PORT, its Jobs API
    gcs_port: int
    folder: Path        # its working folder: where a job runs
    token: str


def _head_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DRCAPS_"))}
    return env | {"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN": token, "RAY_JOB_STOP_SIGNAL": "SIGINT"}


def _kill_leftovers(temp_dir: str) -> None:
    """SIGKILL this head's processes that outlived its group (their command lines name its private temp dir)."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir in (proc_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _wait_for_jobs_api(api: str, token: str, proc: subprocess.Popen[str], timeout_s: float = 180) -> None:
    """Until the Jobs API answers its version (with the token: 401 without one) or the head has exited."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{api}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "ray start exited"
        time.sleep(1)
    pytest.fail(f"the head's Jobs API did not answer on {api} within {timeout_s} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """``ray start --head --block`` with its dashboard on 127.0.0.1 and token authentication, as the stack's head."""
    folder, token = tmp_path_factory.mktemp("head"), secrets.token_hex(16)
    env = _head_env(token)
    probe = subprocess.run([sys.executable, "-c", "import ray.dashboard.modules.job.job_head"], env=env, cwd=folder,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("the head's Jobs API needs Ray's dashboard (ray[default]: aiohttp_cors, opencensus, ...), "
                    f"not installed here: {probe.stderr.strip().splitlines()[-1]}")
    from tests.servers import free_port

    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")     # short: Ray's unix sockets live under it
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                             str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
                             "--temp-dir", temp_dir, "--block"], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_jobs_api(f"http://127.0.0.1:{dashboard}", token, proc)
        yield Head(f"http://127.0.0.1:{dashboard}", gcs, folder, token)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        _kill_leftovers(temp_dir)          # not `ray stop`: that stops every Ray on the machine, others' too
        shutil.rmtree(temp_dir, ignore_errors=True)


def _drcaps(tmp_path: Path, token: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DRCAPS_"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return subprocess.run([str(BIN / "drcaps"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_search_submitted_followed_to_its_end_and_bad_ids_and_tokens_refused(head, tmp_path):
    # The head's own temp dir keeps it off /tmp/ray/ray_current_cluster: a plain ray.init() here never joins it.
    current = Path("/tmp/ray/ray_current_cluster")
    assert not current.is_file() or f":{head.gcs_port}" not in current.read_text()
    text = TINY_EXPERIMENT.replace("name: pre", "name: jobs-e2e") + f"tracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n"
    (tmp_path / "exp.yaml").write_text(text)
    storage = ["--storage-path", str(tmp_path / "ray")]

    refused = _drcaps(tmp_path, "0" * 32, "search", "exp.yaml", "--submit", head.api, *storage)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --submit:"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and "RAY_AUTH_TOKEN" in refused.stderr, refused.stderr

    sub = _drcaps(tmp_path, head.token, "search", "exp.yaml", "--submit", head.api, *storage)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.split(":", 1)[0].removeprefix("submitted ")
    assert job.startswith("drcaps-jobs-e2e-"), sub.stdout
    assert f"drcaps follow {job} --address {head.api}" in sub.stdout
    assert f"ray job stop --address {head.api} {job}" in sub.stdout
    assert "drcaps export-best --experiment jobs-e2e" in sub.stdout

    follow = _drcaps(tmp_path, head.token, "follow", job, "--address", head.api)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "[1/2] trial " in follow.stdout and "[2/2] trial " in follow.stdout, follow.stdout[-3000:]
    assert "exported best config" in follow.stdout and "Traceback" not in follow.stdout + follow.stderr
    assert (head.folder / "drcaps-jobs" / job / "exp.yaml").read_text() == text     # as submitted
    assert (head.folder / "jobs-e2e.best.yaml").is_file()        # the export: the head's working folder

    unknown = _drcaps(tmp_path, head.token, "follow", "drcaps-nothing-000000", "--address", head.api)
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1, unknown.stderr
    assert unknown.stderr.startswith("error: JOB_ID: no job 'drcaps-nothing-000000'"), unknown.stderr
    # A search the head refuses (its storage folder cannot be written there): the job FAILED, follow's exit code 1.
    bad = _drcaps(tmp_path, head.token, "search", "exp.yaml", "--submit", head.api, "--storage-path", "/proc/x")
    assert bad.returncode == 0, bad.stderr
    failed = _drcaps(tmp_path, head.token, "follow", bad.stdout.split(":", 1)[0].removeprefix("submitted "),
                     "--address", head.api)
    assert failed.returncode == 1 and "error: --storage-path:" in failed.stdout, failed.stdout[-2000:]
    assert failed.stderr.strip().endswith("FAILED: drcaps search exited with code 2 (the log above says why)")
    for done in (refused, sub, follow, unknown, bad, failed):
        assert head.token not in done.stdout + done.stderr
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.api], capture_output=True, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}, timeout=120)
    assert listed.stdout.count("submission_id='drcaps-") == 2, listed.stdout[-2000:]   # the refused one: none
