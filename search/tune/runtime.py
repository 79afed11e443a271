"""Ray itself: starting or joining it, what the libraries may print meanwhile, Ctrl-C as Tune handles it, and the
Ray Client path that runs a whole search command on the cluster's head. Nothing here knows about trials or Optuna.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from search.errors import ClusterError

# Messages a user can do nothing about in the default (live view) mode; shown again under -v.
_QUIET_LOGGERS = {"ray._private.authentication.authentication_token_setup": "ERROR",   # a local Ray's token
                  "mlflow.store.db.utils": "WARNING",       # "Creating initial MLflow database tables..."
                  "alembic.runtime.migration": "WARNING", "optuna": "WARNING",  # "A new study created in RDB"
                  "ray.tune.tune": "WARNING"}   # "Wrote the latest version of all result files ... to ..."


@contextlib.contextmanager
def quiet_logs(verbose: int) -> Iterator[None]:
    """Raise the level of the chatty library loggers for the block, then put every level back as it was."""
    import logging

    import optuna  # configures its logger on import: import first, then set the level

    if verbose >= 2:
        yield
        return
    loggers = {name: logging.getLogger(name) for name in _QUIET_LOGGERS}
    before = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(_QUIET_LOGGERS[name])
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    controller.addFilter(_gone_checkpoint)
    # Tune's new output engine prints its configuration box, the results folder and a TensorBoard hint even at
    # verbose=0; its legacy engine is silent at 0. The switch is an environment variable Tune reads in fit().
    try:
        with warnings.catch_warnings(), scoped_env({"RAY_AIR_NEW_OUTPUT": "0"}):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # set_metric_names
            yield
    finally:
        controller.removeFilter(_gone_checkpoint)
        for name, lg in loggers.items():
            lg.setLevel(before[name])


def _gone_checkpoint(record: Any) -> bool:
    """False for Tune's "Error handling checkpoint" traceback when the error is a checkpoint folder already gone: Tune
    restored from a snapshot older than a trial's last checkpoints (the driver was killed) deletes one the killed
    driver had deleted already. Its bookkeeping is updated before the delete; the folder is gone, as wanted."""
    error = record.exc_info[1] if record.exc_info else None
    return not ("Error handling checkpoint" in str(record.msg) and isinstance(error, FileNotFoundError)
                and "checkpoint_" in str(error))


@contextlib.contextmanager
def scoped_env(values: dict[str, str], *, keep_users: bool = False) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there (``keep_users``: leave a variable
    the user set alone)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if not (keep_users and saved[k] is not None):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(address: str | None, verbose: int) -> None:
    import ray

    if ray.is_initialized():
        return
    # No --address: a fresh embedded Ray ("local"), never a cluster someone else started on this machine (plain
    # ray.init() would attach to the last one in /tmp/ray). RAY_ADDRESS, Ray's own convention, still selects one.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # Through Ray Client the cluster forks a server per client, and ~7% of those die at start-up (a gRPC fork race
    # in Ray's proxier, ray-project/ray#63202, open): "Initialization failure from server". Worth two more tries.
    tries = 3 if address.startswith("ray://") else 1
    try:
        for attempt in range(1, tries + 1):
            try:
                # Trials print nothing worth reading (metrics reach Tune's table and MLflow); their logs stay in
                # Ray's session folder instead of repeating "Checkpoint successfully created" on the terminal.
                with _filtered("ray._private.utils", _patch_mismatch, enabled=verbose <= 1):
                    context = ray.init(address=address, log_to_driver=False,
                                       include_dashboard=False if address == "local" else None,
                                       configure_logging=verbose > 1)
                if address == "local":
                    _LOCAL_SESSION[:] = [str(context.address_info.get("session_dir") or "")]
                break
            except ConnectionAbortedError as e:
                if attempt == tries or "Initialization failure from server" not in str(e):
                    raise
                ray.shutdown()                     # drop the half-made client connection before the next try
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        if _auth_refused(e):
            raise ClusterError(
                f"--address: the Ray cluster at {address!r} requires token authentication and this process sent "
                "no token; export RAY_AUTH_MODE=token (the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                "or ~/.ray/auth_token, the same as the head's), or use --address auto on the head node") from None
        raise ClusterError(f"--address: cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); "
                           "start it (ray start --head) or leave --address out to run Ray here") from None


@contextlib.contextmanager
def _filtered(logger: str, keep: Callable[[Any], bool], enabled: bool) -> Iterator[None]:
    """``keep`` as a filter of the logger named ``logger`` for the block (nothing when not ``enabled``)."""
    import logging

    target = logging.getLogger(logger)
    if enabled:
        target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def _patch_mismatch(record: Any) -> bool:
    """False for Ray's "Python patch version mismatch" between a Ray Client and its cluster (3.11.2 vs 3.11.9):
    harmless here, where only plain data and drcaps' own functions (by name) cross; shown again under -v."""
    return not str(record.msg).startswith("Python patch version mismatch")


_LOCAL_SESSION: list[str] = []   # the session folder of the Ray this process started (none: a cluster, or no Ray)


def local_session_dir() -> str | None:
    """The session folder of the Ray this process started (``ray.init``'s ``address_info``), None when it joined a
    cluster or started none: what search/tune/recovery.py records for a later ``--resume``."""
    return _LOCAL_SESSION[0] if _LOCAL_SESSION and _LOCAL_SESSION[0] else None


def _auth_refused(error: BaseException) -> bool:
    """Whether ``ray.init`` failed because the cluster wants a token (Ray >= 2.5x: a head started where
    ``~/.ray/auth_token`` exists turns token authentication on; a driver given an explicit address never does).
    Ray wraps the ``AuthenticationError`` in a RuntimeError's text, so look through the causes and their text."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def _sigint_after_tune(signum: int, frame: Any) -> None:
    """What a second Ctrl-C meets while Tune saves its state after the first: stop now, as Python would."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def tune_interrupt_watch(tune_catches: bool) -> Iterator[Callable[[], bool]]:
    """Tell, once the block is left, whether ``Tuner.fit`` inside it ended because of SIGINT / SIGUSR1.

    Tune's handler records the signal in a local flag and restores the SIGINT handler that was in place when the
    run began, so a marker handler installed here is back in place after ``fit`` exactly when the signal came,
    whatever state the trials were in (the one that had just finished, the next one not yet started). The
    previous handler is restored on the way out. ``tune_catches``: whether Tune installs its handler in this
    process at all (not through Ray Client, not with ``TUNE_DISABLE_SIGINT_HANDLER=1``).
    """
    if not tune_catches or threading.current_thread() is not threading.main_thread():   # handlers: main only
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, _sigint_after_tune)
    seen = [False]
    try:
        yield lambda: seen[0]
    finally:
        # Read before restoring: the answer is which handler is in place when fit() has returned.
        seen[0] = signal.getsignal(signal.SIGINT) is _sigint_after_tune
        signal.signal(signal.SIGINT, previous)


END_OF_SEARCH_IMPORTS = ("mlflow.pytorch", "mlflow.models", "plotly.express", "plotly.offline", "optuna.visualization",
                         "pandas")   # registration (search/tracking/registry.py), the report


def warm_end_of_search() -> None:
    """Import what the end of a search needs (seconds of imports) while the trials run, in a thread at the lowest
    CPU priority (Linux: a thread's own nice value), so the registration and the report start at once."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    for name in END_OF_SEARCH_IMPORTS:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


# ================================================================ Ray Client: the search driver as a task on the head
#
# `drcaps search --address ray://HOST:10001` makes this process a Ray Client only: the machine it runs on need not
# reach the MLflow server, PostgreSQL or Ray's storage folder. The whole command
# (search.commands.cluster.search_on_head: every check, run_search, the export) runs as ONE Ray task pinned to the
# head node, where URIs and paths are as the
# cluster sees them (the head's MLFLOW_TRACKING_URI, DRCAPS_OPTUNA_STORAGE and DRCAPS_STORAGE_PATH, which
# docker-compose.yml sets). The task returns plain data. Tune's own Ray Client support is not enough: it moves only
# Tuner.fit to the head, leaving the parent run, the Optuna study and the export here, against URIs this machine may
# not reach (issue 6: "unable to open database file" on the head, after a parent run was already made here).
# A Ctrl-C here cancels the task: Ray raises KeyboardInterrupt in it, Tune saves its state and the search ends as on
# a terminal (parent run KILLED); this side waits for that, then exits with code 130.

HEAD_RESOURCE = "node:__internal_head__"       # a resource only the head node has
CANCEL_WAIT_S = 120.0                          # how long a Ctrl-C waits for the head task to save and close its runs


def is_ray_client(address: str | None) -> bool:
    """Whether a search joins its cluster through Ray Client (``--address ray://...``, or ``RAY_ADDRESS``)."""
    return (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://")


def _on_head(events: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """On the head: ``fn(*args)`` with its events (search/tune/relay.py) put on the client's queue as they come, the
    last one :data:`relay.END` (put and waited for: every event before it has arrived when it is read)."""
    import ray

    from search.tune import relay

    def put(event: relay.Event) -> None:
        events.actor.put_nowait.remote(event)          # not waited for; one caller's calls arrive in order

    with relay.sending(put):
        try:
            return fn(*args)
        finally:
            with contextlib.suppress(Exception):
                ray.get(events.actor.put_nowait.remote(relay.END), timeout=30)


def _replay(events: Any, on_event: Callable[[Any], None]) -> bool:
    """Every event waiting on the queue, handed to ``on_event`` in order; whether the last one (END) came."""
    from search.tune import relay

    ended = False
    waiting = events.qsize()
    for event in events.get_nowait_batch(waiting) if waiting else []:
        if tuple(event) == relay.END:
            ended = True
        else:
            on_event(event)
    return ended


def run_on_head(address: str, fn: Callable[..., Any], *args: Any,
                on_event: Callable[[Any], None] = lambda event: None) -> Any:
    """``fn(*args)`` as one Ray task on the head node of the cluster at ``address`` (``ray://HOST:PORT``); its
    result. ``fn`` must be importable on the cluster (drcaps installed there, the same version) and return plain
    data. The task asks for no CPU (the head of docker-compose.yml offers none to trials) and is never retried.
    While it runs, what it sends (search/tune/relay.py: lines, live-view events) reaches ``on_event`` here, through a
    queue actor on the head, a few times a second."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.queue import Queue

    init_ray(address, 0)
    try:
        events = Queue(actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}})
        task = ray.remote(num_cpus=0, max_retries=0, resources={HEAD_RESOURCE: 0.001})(_on_head)
        ref = task.remote(events, fn, *args)
        try:
            done_at = None
            while not _replay(events, on_event):
                ready, _ = ray.wait([ref], timeout=0.25)
                done_at = done_at or (time.monotonic() if ready else None)
                if done_at and time.monotonic() - done_at > 10:     # the task died before its last event
                    break
            return ray.get(ref)
        except KeyboardInterrupt:
            ray.cancel(ref)                       # KeyboardInterrupt in the task: the search stops and saves
            with contextlib.suppress(RayError, GetTimeoutError, KeyboardInterrupt):
                ray.get(ref, timeout=CANCEL_WAIT_S)
            raise
    finally:
        ray.shutdown()
