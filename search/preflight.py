"""Every check a search can make before any work starts, and the per-experiment lock: nothing here writes a record.

``check_search`` runs before Ray starts or the parent run exists (search_command and run_search call it);
``check_cluster_resources`` right after ``ray.init`` (search/tune.py), still before the parent run; ``check_output``,
``check_space_corners`` and ``check_data`` are the command layer's own up-front checks (search/commands/). Each
failure is one :class:`~drcapsnet.errors.DrcapsError` line naming the field or flag and the fix. No Ray, no MLflow:
only ``check_data`` loads anything (the data, through drcapsnet), and only when called.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drcapsnet.errors import ConfigError, UsageError
from search import stores
from search.errors import ClusterError
from search.state import STATE_FILE

if TYPE_CHECKING:
    from drcapsnet.config import RunConfig
    from search.experiment import Experiment

EVERY_EPOCH = ("train_loss", "images_per_s", "epoch_s")             # in every epoch's report
OPTUNA_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
MAX_CORNERS = 4096   # space corners tried up front: every combination of each field's ends (or choices)
SHAPE_FIELDS = ("in_channels", "image_size", "num_classes")   # model fields the data alone decides


def writable_folder_problem(path: Path) -> str | None:
    """Why files cannot be created under the folder ``path`` (made on demand), or None. Asks the filesystem (a
    temporary file created and removed in the nearest existing folder); creates nothing that stays."""
    return stores.folder_problem(path)


def writable_file_problem(path: Path) -> str | None:
    """Why the file ``path`` cannot be written (created or replaced), or None. Creates nothing that stays."""
    return stores.file_problem(path)


def check_output(flag: str, path: Path | None, folder: bool = False) -> None:
    """An output a command will write must be writable BEFORE any work (a file, or a folder with ``folder``)."""
    if path is None:
        return
    problem = writable_folder_problem(path) if folder else writable_file_problem(path)
    if problem:
        raise UsageError(f"{flag}: cannot write {path}: {problem}; pass a writable path")


def _ends(spec: Any) -> list[Any]:
    """A searched field's corner values: its choices, or its low and high."""
    return list(spec.choices) if spec.type == "categorical" else [spec.low, spec.high]


def check_space_corners(exp: Experiment) -> None:
    """Fields that are fine alone can clash together (``model.conv_kernel`` and ``model.primary_kernel`` both at
    their highs leave no capsule grid): try every combination of each searched field's ends or choices, so a
    config error surfaces here, once, and not inside trials that Ray would retry."""
    from search.space import apply_params

    space = exp.search.space
    candidates = [_ends(spec) for spec in space.values()]
    if not candidates or math.prod(len(c) for c in candidates) > MAX_CORNERS:
        return
    for values in itertools.product(*candidates):
        params = dict(zip(space, values))
        try:
            apply_params(exp, params)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"search.space: the combination {shown} is rejected ({e}); narrow those "
                              "ranges") from None


def check_data(run: RunConfig, space: Mapping[str, Any]) -> None:
    """Load the data once up front (a torchvision dataset is downloaded here, once, not by every trial) and check
    that the model and every value the search may propose fit it."""
    from drcapsnet.data import load_datasets
    from drcapsnet.train import check_compatible

    datasets = load_datasets(run.data)
    check_compatible(run.model, datasets)
    for name in SHAPE_FIELDS:
        spec = space.get(f"model.{name}")
        if spec is None:
            continue
        want = getattr(datasets, name)
        values = _ends(spec)
        if any(v != want for v in values):
            raise ConfigError(f"search.space.model.{name}: the data ({run.data.dataset}) fixes model.{name} at "
                              f"{want}, but the space proposes {values}; remove model.{name} from search.space")


def check_metric_every_epoch(metric: str, epochs: int, eval_interval: int, space: Mapping[str, object],
                             scheduler: str) -> None:
    """Ray Tune needs the search metric in EVERY epoch's report (and ASHA/median rank trials by it each epoch):
    ``test_*`` exist only after the last epoch, ``val_*`` only on evaluation epochs."""
    if metric in EVERY_EPOCH or epochs == 1:
        return
    if metric.startswith("test_"):
        raise ConfigError(f"search.metric: {metric} is measured only after the last epoch, but the search (and its "
                          f"{scheduler} scheduler) needs it every epoch; use val_acc or val_loss")
    if "train.eval_interval" in space:
        raise ConfigError(f"search.space.train.eval_interval: {metric} must be reported every epoch; remove "
                          "train.eval_interval from search.space (keep it 1)")
    if eval_interval > 1:
        raise ConfigError(f"train.eval_interval: {eval_interval} reports {metric} only every {eval_interval} epochs, "
                          f"but the search (and its {scheduler} scheduler) needs it every epoch; set "
                          "train.eval_interval: 1")


def check_optuna_storage(url: str) -> None:
    """The Optuna storage must be an RDB URL with a scheme SQLAlchemy knows. A SQLite file must be writable, a
    database if it exists, and its filesystem roomy enough (search/stores.py); a server's driver must be installed
    and the server listening (a few seconds at most; the password is masked in the message)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in OPTUNA_SCHEMES:
        raise ConfigError(f"search.storage: {url!r} is not an Optuna RDB URL; use sqlite:///<abs path>/optuna.db "
                          f"or one of {', '.join(s + '://' for s in OPTUNA_SCHEMES[1:])}")
    if scheme != "sqlite":
        if problem := stores.server_problem(url):      # driver installed, server listening; password masked
            raise ConfigError(f"search.storage: {problem}")
        return
    path = Path(url.removeprefix("sqlite:///").partition("?")[0])
    if problem := (writable_file_problem(path) if path.is_absolute() else "not an absolute path"):
        raise ConfigError(f"search.storage: cannot write the Optuna study to {url}: {problem}; set "
                          "search.storage to sqlite:///<writable folder>/optuna.db")
    if problem := stores.sqlite_problem(path):
        raise ConfigError(f"search.storage: the Optuna storage {problem}; move it aside (mv {path} {path}.bad) or "
                          "set search.storage to sqlite:///<another file>")
    if problem := stores.space_problem(path.parent):
        raise ConfigError(f"search.storage: {problem}; free some space, or put the storage elsewhere "
                          "(search.storage: sqlite:///<folder on another filesystem>/optuna.db)")


# HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5): a gRPC server (Ray's GCS
# and its Ray Client server both are) answers with a SETTINGS frame of its own, frame type 0x4.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _answers_grpc(conn: socket.socket, timeout_s: float) -> bool | None:
    """Whether the server on ``conn`` speaks HTTP/2 (gRPC): True, False (it answered something else, or closed),
    None (no answer within ``timeout_s``: a busy head may be slow; undecided)."""
    conn.settimeout(timeout_s)
    head = b""
    try:
        conn.sendall(_HTTP2_HELLO)
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except TimeoutError:
        return None if not head else False
    except OSError:
        return False
    return head[3] == 0x4


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """``--address``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; something must accept a TCP connection there
    within ``timeout_s``, and it must speak gRPC as a Ray head does (Ray itself retries an unreachable address, or a
    port where another server answers, for minutes, ignoring Ctrl-C). With Ray's TLS (``RAY_USE_TLS``) only the
    connection is checked."""
    if address in (None, "auto", "local"):
        return
    assert address is not None
    rest = address.removeprefix("ray://")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536 or "/" in rest:
        raise ClusterError(f"--address: {address!r} is not auto, HOST:PORT or ray://HOST:PORT "
                           "(e.g. 127.0.0.1:6379 or ray://head:10001)")
    try:
        conn = socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s)
    except OSError as e:
        raise ClusterError(f"--address: cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start it "
                           "(ray start --head) or leave --address out to run Ray here") from None
    with conn:
        tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
        if not tls and _answers_grpc(conn, timeout_s) is False:
            default = "10001 (Ray Client)" if address.startswith("ray://") else "6379 (the head's GCS)"
            raise ClusterError(f"--address: something answers at {address!r} but it is not a Ray cluster (no gRPC "
                               f"server there); check the host and port (Ray's default port: {default})")


def check_resources(asked: Mapping[str, float], available: Mapping[str, float], address: str | None) -> None:
    """A trial's resources must fit the cluster, else its trials would wait PENDING forever."""
    where = f"the Ray cluster at {address}" if address else "this machine's Ray"
    for field, key in (("cpu", "CPU"), ("gpu", "GPU")):
        need, have = float(asked.get(field, 0.0)), float(available.get(key, 0.0))
        if need > have:
            raise ClusterError(f"search.resources.{field}: each trial asks for {need:g} {key}s but {where} has "
                               f"{have:g}; set search.resources.{field} to at most {have:g}")


def check_storage(storage_root: Path, experiment: str, resume: bool) -> None:
    """``--storage-path`` must be a writable folder; ``--resume`` needs an earlier search's state there."""
    if problem := writable_folder_problem(storage_root):
        raise UsageError(f"--storage-path: cannot write Ray's results to {storage_root}: {problem}; pass a "
                         "writable folder")
    if problem := stores.space_problem(storage_root):
        raise UsageError(f"--storage-path: {problem}; free some space, or pass a --storage-path on another "
                         "filesystem")
    state = storage_root / experiment / STATE_FILE
    if resume and not state.is_file():
        raise ClusterError(f"--resume: no interrupted search of '{experiment}' in {storage_root / experiment}; "
                           "run it without --resume, or pass the --storage-path it used")
