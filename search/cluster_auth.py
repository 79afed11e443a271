"""What a client of the cluster (docs/cluster.md, docker-compose.yml) needs: credentials for its servers, read the way
the libraries themselves read them, checked once before any run is created, and never printed; and the servers'
addresses as the client reaches them (:func:`as_published`).

- MLflow's basic-auth app: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or a bearer
  ``MLFLOW_TRACKING_TOKEN``), as MLflow's own client sends them.
- Ray's token (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) is
  Ray's to send; search/tune/ray_token.py asks a Ray Client server once whether it accepts it.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request

from drcapsnet.errors import TrackingError

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def mlflow_headers() -> dict[str, str]:
    """The Authorization header MLflow's client would send, from the environment ({} when none is set)."""
    user, password = os.environ.get(CREDENTIALS[0]), os.environ.get(CREDENTIALS[1])
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token := os.environ.get(CREDENTIALS[2]):
        return {"Authorization": f"Bearer {token}"}
    return {}


def login_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the MLflow server at ``uri`` (http/https) does not let this process in, or None: a request that needs a
    login, sent with :func:`mlflow_headers`. Says which variables to set; never shows their values."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    headers = mlflow_headers()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:  # noqa: S310
            resp.read(64)
    except urllib.error.HTTPError as e:
        if e.code == 401 and not headers:
            return (f"the MLflow server at {uri} requires a login; set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (docs/cluster.md: the stack's are in its .env)")
        if e.code == 401:
            who = os.environ.get(CREDENTIALS[0])
            what = f"user {who!r} with MLFLOW_TRACKING_PASSWORD" if who else "MLFLOW_TRACKING_TOKEN"
            return (f"the MLflow server at {uri} refused the login of {what} (HTTP 401); set the right "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        if e.code == 403 and headers:
            body = e.read(512).decode(errors="replace") if e.fp else ""
            if "Invalid Host header" not in body:
                return (f"the MLflow server at {uri} lets {os.environ.get(CREDENTIALS[0]) or 'this token'} in but "
                        "denies it access (HTTP 403); ask its admin for a permission (docs/cluster.md: users)")
    except (urllib.error.URLError, OSError):
        return None                  # unreachable: check_tracking_uri says so
    return None


def check_mlflow_login(uri: str, option: str = "tracking.uri") -> None:
    """One TrackingError line (exit code 2) when an http(s) tracking server refuses this process's login."""
    if uri.startswith(("http://", "https://")) and (problem := login_problem(uri)):
        raise TrackingError(f"{option}: {problem}")


def as_published(text: str) -> str:
    """``text`` with the head's MLflow address (``MLFLOW_TRACKING_URI``: the compose network's ``http://mlflow:5000``,
    which a person's machine cannot open) written as that machine reaches it: ``DRCAPS_MLFLOW_PUBLIC_URL``, which
    docker-compose.yml sets to the published port. Unchanged where either is unset."""
    inside = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
    outside = os.environ.get("DRCAPS_MLFLOW_PUBLIC_URL", "").rstrip("/")
    return text.replace(inside, outside) if inside and outside else text


def inside_a_stack() -> bool:
    """Whether this process runs on a node of a stack whose services have other names outside it (docker-compose.yml
    sets ``DRCAPS_MLFLOW_PUBLIC_URL``): the MLflow address is rewritten by :func:`as_published`; PostgreSQL is not
    published at all."""
    return bool(os.environ.get("DRCAPS_MLFLOW_PUBLIC_URL"))
