"""``drcaps search --submit`` and ``drcaps follow`` (search/commands/jobs.py): a search as a Ray Job.

Fast: every bad input that needs no cluster, through ``drcaps`` itself (``cli.main``): exit code 2, ONE ``error:``
line naming the flag and the fix, nothing submitted; and the job's shell command run by a real ``sh``.
End to end, against the compose stack's authenticated head (tests/cluster/test_compose.py, in CI): a search
submitted, followed live, stopped, resumed and followed to SUCCEEDED; a job the head refuses followed to FAILED
(exit code 1); a wrong or missing token and an unknown job id refused in one line, exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
import threading
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
