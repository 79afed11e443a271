"""A search handed to Ray Jobs from this machine (docs/cluster.md, "As a Ray Job"): ``drcaps search EXP.yaml
--submit [ADDRESS]`` submits ``drcaps search EXP.yaml --address auto`` (with the other flags given) to the Jobs API
at ADDRESS (``http://HOST:8265``) and returns; ``drcaps follow JOB_ID`` streams its log until it ends.

The job runs on the head in the head's working folder (where ``ray start`` ran: ``/work`` in the stack), exactly as
``ray job submit -- drcaps search FILE --address auto`` does, so its export, default Ray storage, Optuna store and
``--resume`` state are where they would be for that recipe. The experiment file travels in the job's environment
(``DRCAPS_JOB_EXPERIMENT``), and the job writes it to ``drcaps-jobs/<job id>/<file name>`` there before the search
starts. Ray's ``working_dir`` would carry it too, but it makes the job's folder a package folder that Ray unpacks
per upload and deletes when its cache fills: the export and the state of a later ``--resume`` would be lost there.

Ray's own client (``JobSubmissionClient``) sends the token, read as ``ray job`` reads it: under
``RAY_AUTH_MODE=token``, from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. Every problem it
meets before a job exists (no Jobs API there, no or a wrong token, an unknown job id) is one ClusterError line; the
client and the token's wording are search/tune/ray_token.py's (Ray is touched in search/tune/ only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drcapsnet.errors import UsageError
from search.errors import ClusterError

if TYPE_CHECKING:
    from search.experiment import Experiment

DEFAULT_JOBS_API = "http://127.0.0.1:8265"   # the stack's published dashboard port (docker-compose.yml)
EXPERIMENT_ENV = "DRCAPS_JOB_EXPERIMENT"     # the experiment file's text, in the job's environment
JOBS_FOLDER = "drcaps-jobs"                  # <head's working folder>/drcaps-jobs/<job id>/<file>: what was submitted
EXIT_CODES = {"SUCCEEDED": 0, "STOPPED": 130, "FAILED": 1}   # what `drcaps follow` returns for a job's end
RESUME_KEY = "drcaps_resume"                 # the job's metadata: the command that continues its search


def jobs_address(given: str | None, flag: str) -> str:
    """The Jobs API to use: ``given``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` when it is an
    http(s):// address (as ``ray job`` reads them), else the stack's ``http://127.0.0.1:8265``. ``flag`` names the
    option in an error: a value that is not ``http(s)://HOST[:PORT]`` (e.g. an experiment file that argparse took
    for the address) is one UsageError line."""
    if not given:
        from_env = [v for v in (os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")) if v]
        given = next((v for v in from_env if v.startswith(("http://", "https://"))), DEFAULT_JOBS_API)
    parts = urllib.parse.urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise UsageError(f"{flag}: {given!r} is not the address of a Ray Jobs API; give http://HOST:8265 (the head's "
                         "dashboard port), e.g. " + DEFAULT_JOBS_API)
    return given.rstrip("/")


def job_argv(experiment: Path, overrides: list[str], options: dict[str, Any]) -> list[str]:
    """``drcaps search <file> --address auto`` and the flags the user gave, as the head runs them: paths
    (``--storage-path``, ``--out``) and ``--tracking-uri`` are the head's, unchanged."""
    argv = ["drcaps", "search", experiment.name, "--address", "auto"]
    argv += [x for o in overrides for x in ("--set", o)]
    for flag in ("tracking_uri", "storage_path", "out", "extend"):
        if options.get(flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(options[flag])]
    argv += [f"--{flag.replace('_', '-')}" for flag in ("resume", "smoke_test") if options.get(flag)]
    return argv + ["-v"] * int(options.get("verbose") or 0)


def entrypoint(job_id: str, argv: list[str]) -> str:
    """The job's shell command: the experiment file written from the job's environment into
    ``drcaps-jobs/<job id>/`` under the head's working folder, then the search ``exec``'d (so ``ray job stop``'s
    signal reaches drcaps itself, not a shell)."""
    folder = f"{JOBS_FOLDER}/{job_id}"
    path = f"{folder}/{argv[2]}"
    command = [*argv[:2], path, *argv[3:]]
    return (f"mkdir -p {shlex.quote(folder)} && printf '%s' \"${EXPERIMENT_ENV}\" > {shlex.quote(path)} && "
            f"exec {shlex.join(command)}")


def submit_command(experiment: Path, overrides: list[str], *, submit: str | None, address: str | None = None,
                   **options: Any) -> int:
    """``drcaps search EXP.yaml --submit [ADDRESS]``: the search as a Ray Job on the cluster whose Jobs API is at
    ``submit``, with ``options`` (the search's other keyword arguments: tracking_uri, storage_path, out, resume,
    smoke_test, verbose, extend). Checked here first, nothing submitted on any problem: the experiment file with its
    overrides, the Jobs API and the token. Prints the job id and how to follow, stop and continue it, and where its
    export will be."""
    from search.experiment import load_experiment
    from search.plan import smoke_experiment
    from search.tune.ray_token import jobs_client

    if address is not None:
        raise UsageError("--submit: not with --address (the job runs the search on the cluster's head with "
                         "--address auto); leave --address out")
    api = jobs_address(submit, "--submit")
    exp = load_experiment(experiment, overrides)            # a bad file: one line here, not a failed job
    if options.get("smoke_test"):
        exp = smoke_experiment(exp)
    client = jobs_client(api, "--submit")
    job_id = f"drcaps-{''.join(c if c.isalnum() or c in '-_.' else '-' for c in exp.name)}-{secrets.token_hex(3)}"
    again = (f"drcaps search {shlex.quote(str(experiment))} --submit {api} --resume"
             + "".join(f" --set {shlex.quote(o)}" for o in overrides)
             + "".join(f" --{k.replace('_', '-')} {shlex.quote(str(options[k]))}"
                       for k in ("tracking_uri", "storage_path", "out") if options.get(k) is not None)
             + (" --smoke-test" if options.get("smoke_test") else ""))
    try:
        client.submit_job(entrypoint=entrypoint(job_id, job_argv(experiment, overrides, options)),
                          submission_id=job_id, runtime_env={"env_vars": {EXPERIMENT_ENV: experiment.read_text()}},
                          metadata={"drcaps_experiment": exp.name, RESUME_KEY: again})
    except RuntimeError as e:
        raise ClusterError(f"--submit: the Ray cluster at {api} refused the job ({str(e).splitlines()[0]}); "
                           "check its dashboard log (docs/cluster.md)") from None
    _print_submitted(job_id, api, exp, again, options)
    return 0


def _print_submitted(job_id: str, api: str, exp: Experiment, again: str, options: dict[str, Any]) -> None:
    out = options.get("out") or f"{exp.name}.best.yaml"
    mlflow = options.get("tracking_uri") or exp.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") \
        or "http://127.0.0.1:5000"
    print(f"submitted {job_id}: the search of {exp.name} runs as a Ray Job on the cluster at {api}, without this "
          "terminal\n"
          f"  follow it:   drcaps follow {job_id} --address {api}\n"
          f"  stop it:     ray job stop --address {api} {job_id}   (the stack's head: as Ctrl-C, state saved)\n"
          f"  continue it: {again}\n"
          f"  its export:  {out} in the head's working folder (the stack's: /work), or from MLflow:\n"
          f"               drcaps export-best --experiment {exp.mlflow_experiment} --tracking-uri "
          f"{shlex.quote(str(mlflow))} --out {exp.name}.best.yaml", flush=True)


async def _stream(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow_command(job_id: str, *, address: str | None = None) -> int:
    """``drcaps follow JOB_ID``: the job's log from its start, as it comes, then its end as the exit code: 0
    SUCCEEDED, 130 STOPPED, 1 FAILED. Ctrl-C detaches (the job keeps running; exit code 130). An unknown job id,
    no Jobs API or a refused token: one ClusterError line."""
    from search.tune.ray_token import jobs_client

    api = jobs_address(address, "--address")
    client = jobs_client(api, "--address")
    try:
        client.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" not in str(e):
            raise ClusterError(f"--address: the Ray cluster at {api} did not answer for job {job_id!r} "
                               f"({str(e).splitlines()[0]})") from None
        raise ClusterError(f"JOB_ID: no job {job_id!r} on the Ray cluster at {api}; list its jobs with "
                           f"ray job list --address {api}") from None
    stop = f"ray job stop --address {api} {job_id}"
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)   # "WebSocket closed ..." lines
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        print(f"detached: job {job_id} keeps running on the cluster; follow it again with\n  drcaps follow {job_id} "
              f"--address {api}\nor stop it with\n  {stop}", file=sys.stderr)
        return 130
    except RuntimeError as e:                           # the websocket closed before the job ended
        raise ClusterError(f"--address: the log stream of job {job_id} from {api} broke off "
                           f"({str(e).splitlines()[0]}); the job may still run: follow it again") from None
    info = _final_info(client, job_id)
    status = str(info.status)
    if status == "STOPPED" and (again := (info.metadata or {}).get(RESUME_KEY)):
        print(f"job {job_id} STOPPED; continue its search with\n  {again}", file=sys.stderr)
    elif status != "SUCCEEDED":         # Ray's message would repeat the log's tail, shown above already
        code = getattr(info, "driver_exit_code", None)
        why = f"drcaps search exited with code {code} (the log above says why)" if code is not None else \
            (info.message or "").partition("\n")[0]
        print(f"job {job_id} {status}: {why}", file=sys.stderr)
    return EXIT_CODES.get(status, 1)


def _final_info(client: Any, job_id: str, wait_s: float = 30.0) -> Any:
    """The job's info once its status is terminal (the log stream can end a moment before the status is written)."""
    deadline = time.monotonic() + wait_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info
