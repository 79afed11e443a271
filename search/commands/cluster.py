"""``drcaps search --address ray://HOST:10001`` (docs/cluster.md): this machine is only a Ray Client. The whole
command (:func:`search_on_head`) runs as one Ray task on the cluster's head (search.tune.run_on_head); what crosses
is picklable plain data: the experiment file's text, the overrides, the options dict, and the outcome dict back.
While it runs, its lines and its live view come back as events (search/tune/relay.py) and are shown here as a local
search shows them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from drcapsnet.errors import ConfigError
from search.cluster_auth import as_published
from search.preflight import check_output


def search_through_ray_client(experiment: Path, overrides: list[str], *, address: str,
                              tracking_uri: str | None = None, storage_path: Path | None = None,
                              out: Path | None = None, resume: bool = False, smoke_test: bool = False,
                              verbose: int = 0) -> int:
    """:func:`search_command` through Ray Client: this machine need not reach MLflow, PostgreSQL or Ray's storage
    folder. Every check, the search and the export run on the cluster's head, with every URI and path as the cluster
    sees it. Here: the checks that need nothing but this machine, then the exported files are written here and the
    summary printed. Ctrl-C cancels the search on the cluster (its state saved, parent run KILLED): exit code 130."""
    from search import preflight, tracking
    from search.experiment import load_experiment
    from search.tune import run_on_head
    from search.tune.ray_token import check_ray_client_token
    from search.tune.relay import Shower

    exp = load_experiment(experiment, overrides)
    if explicit := tracking_uri or exp.tracking.uri:
        tracking.check_tracking_uri_from_client(tracking.resolve_tracking_uri(explicit),
                                                "--tracking-uri" if tracking_uri else "tracking.uri")
    storage = exp.search.storage or ""
    if storage.startswith("sqlite:"):
        raise ConfigError(f"search.storage: {storage} is a SQLite file on this machine, which the Ray cluster's head "
                          "(where a search started with --address ray://... runs) cannot open; use a postgresql:// "
                          "server the cluster reaches, or leave it out to use the head's DRCAPS_OPTUNA_STORAGE, or "
                          "run the search inside the stack (docker compose exec ray-head drcaps search ... "
                          "--address auto)")
    folder = (out or Path.cwd() / "placeholder").resolve().parent
    check_output("--out", folder, folder=True)
    preflight.check_address(address)       # last of the local checks: seconds, not Ray Client's 30 s timeout
    check_ray_client_token(address)        # a refused token: one line now, not Ray Client's 30 s timeout
    print(f"running the search on the Ray cluster at {address}: the whole driver runs on its head node, its "
          "progress is shown here as it goes", flush=True)
    options: dict[str, Any] = {"tracking_uri": tracking_uri, "storage_path": storage_path, "out": out,
                               "resume": resume, "smoke_test": smoke_test, "verbose": verbose}   # no address there
    shower = Shower({"out": str(folder), "experiment": str(experiment.resolve().parent)})
    try:
        outcome = run_on_head(address, search_on_head, experiment, overrides, options, experiment.read_text(),
                              on_event=shower)
    except KeyboardInterrupt:
        shower.close(interrupted=True)
        again = f"drcaps search {experiment} --resume --address {address}" + "".join(
            f" {flag} {value}" for flag, value in (("--storage-path", storage_path),
                                                   ("--tracking-uri", tracking_uri)) if value) + (
            " --smoke-test" if smoke_test else "")
        print(f"interrupted: the search's state is saved on the cluster; continue it with\n  {again}",
              file=sys.stderr)
        return 130
    shower.close(interrupted=False)
    if outcome["error"] is not None:
        raise outcome["error"]
    for name, content in outcome["files"].items():           # the exported config, all trials, ...
        (folder / name).write_bytes(content)
    return int(outcome["code"])                               # its output was shown as it came (shower)


def search_on_head(experiment: Path, overrides: list[str], options: dict[str, Any],
                   experiment_text: str) -> dict[str, Any]:
    """``drcaps search`` as a task on the head node (search.tune.run_on_head): :func:`search_command` with
    ``options`` (its keyword arguments but ``address``) over a copy of the experiment file (``experiment_text``,
    named as ``experiment``), its files written to a temporary folder, returned as plain data: ``error`` (a
    DrcapsError, raised again on the client), else ``code`` and ``files`` ({name: bytes}). What it prints is sent
    line by line as it is printed (search/tune/relay.py), with the temporary folders (``paths``) the lines name.
    A Ctrl-C on the client arrives here as KeyboardInterrupt: the search stops as it would on a terminal."""
    import contextlib

    from drcapsnet.errors import DrcapsError
    from search.commands.searching import search_command
    from search.experiment import load_experiment
    from search.plan import smoke_experiment
    from search.tune import relay
    from search.tune.relay import LineStream

    stdout, stderr = LineStream("out", as_published), LineStream("err", as_published)   # sent as printed
    with tempfile.TemporaryDirectory(prefix="drcaps-out-") as out, \
            tempfile.TemporaryDirectory(prefix="drcaps-exp-") as folder:
        relay.send("paths", {"out": out, "experiment": folder})
        copy = Path(folder) / Path(experiment).name
        copy.write_text(experiment_text)
        try:
            exp = load_experiment(copy, overrides)
            given: Path | None = options.get("out")
            name = given.name if given else \
                f"{(smoke_experiment(exp) if options.get('smoke_test') else exp).name}.best.yaml"
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = search_command(copy, overrides, **{**options, "address": None, "out": Path(out) / name})
        except DrcapsError as e:
            return {"error": e}
        finally:
            stdout.close_lines()
            stderr.close_lines()
        files = {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}
    return {"error": None, "code": code, "files": files}

