"""Whether a Ray cluster accepts this process's token (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; docs/cluster.md), through its Ray Client server or its Jobs API,
said in the same words, never showing the token.

- Ray Client: a server refuses a missing or wrong token with gRPC UNAUTHENTICATED, which Ray's client retries as if
  the port were unreachable (30 s, then "connection timeout"): :func:`check_ray_client_token` asks once.
- Jobs API (``drcaps search --submit``, ``drcaps follow``; search/commands/jobs.py): :func:`jobs_client` is Ray's
  ``JobSubmissionClient``, whose construction asks the server's version with the token.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any

from search.errors import ClusterError

_ASK_MODE = ("the Ray cluster at {address} requires token authentication; export RAY_AUTH_MODE=token and "
             "RAY_AUTH_TOKEN (the cluster's token: the stack's is in its .env)")
_REFUSED = ("the Ray cluster at {address} refused this process's token (RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token); set RAY_AUTH_TOKEN to the cluster's token (the stack's is in its .env)")


def ray_client_token_problem(address: str, timeout_s: float = 10.0) -> str | None:
    """Why the Ray Client server at ``address`` (``ray://HOST:PORT``, known to answer gRPC) refuses this process, or
    None: one PING on a channel made the way Ray's client makes it (with the token when ``RAY_AUTH_MODE=token``).
    Any answer but UNAUTHENTICATED (including errors) is left to ``ray.init``."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    try:
        channel = init_grpc_channel(address.removeprefix("ray://"), asynchronous=False)
    except Exception as e:               # noqa: BLE001  token mode without any token: Ray refuses to build it
        if "token" not in str(e).lower():
            return None
        channel = None
    if channel is not None:
        try:
            ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout_s)
            return None
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                return None
        finally:
            channel.close()
    return (_REFUSED if token_mode else _ASK_MODE).format(address=address)


def check_ray_client_token(address: str) -> None:
    """One ClusterError line (exit code 2) when the Ray Client server at ``address`` refuses this process's token."""
    if address.startswith("ray://") and (problem := ray_client_token_problem(address)):
        raise ClusterError(f"--address: {problem}")



def jobs_token_problem(address: str, ray_message: str) -> str:
    """Why the Jobs API at ``address`` refused this process (from Ray's AuthenticationError text)."""
    if ray_message.startswith("Authentication required") and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return _ASK_MODE.format(address=address)
    if ray_message.startswith(("Authentication failed", "Authentication required")):
        return _REFUSED.format(address=address)
    first = ray_message.strip().splitlines()[0] if ray_message.strip() else "no token found"
    return (f"RAY_AUTH_MODE=token but Ray has no token to send ({first}); set RAY_AUTH_TOKEN to the cluster's token "
            "(the stack's is in its .env)")


def jobs_client(address: str, flag: str) -> Any:
    """A ``JobSubmissionClient`` for the Jobs API at ``address``, its connection and token checked (Ray asks for the
    server's version, which needs the token): a closed port, something that is not a Jobs API, or a refused token
    is one ClusterError line naming ``flag``. A TCP check first: Ray's client waits on a silent host forever."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    parts = urllib.parse.urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    start = (f"start the cluster (docker compose up -d, docs/cluster.md) or pass {flag} http://HOST:8265, the "
             "address of its head's dashboard")
    try:
        socket.create_connection((parts.hostname or "", port), timeout=5.0).close()
    except OSError as e:
        raise ClusterError(f"{flag}: no Ray Jobs API answers at {address} ({e.strerror or e}); {start}") from None
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise ClusterError(f"{flag}: {jobs_token_problem(address, str(e))}") from None
    except (ConnectionError, RuntimeError) as e:     # RuntimeError: a server without /api/version (not Ray's)
        raise ClusterError(f"{flag}: no Ray Jobs API answers at {address} ({str(e).splitlines()[0]}); "
                           f"{start}") from None
