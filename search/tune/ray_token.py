"""Whether a Ray Client server accepts this process's token (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; docs/cluster.md). A server refuses a missing or wrong token with
gRPC UNAUTHENTICATED, which Ray's client retries as if the port were unreachable (30 s, then "connection timeout"):
:func:`check_ray_client_token` asks once and says what to set, never showing the token.
"""

from __future__ import annotations

import os

from search.errors import ClusterError


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
    if not token_mode:
        return (f"the Ray cluster at {address} requires token authentication; export RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN (the cluster's token: the stack's is in its .env)")
    return (f"the Ray cluster at {address} refused this process's token (RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token); set RAY_AUTH_TOKEN to the cluster's token (the stack's is in its .env)")


def check_ray_client_token(address: str) -> None:
    """One ClusterError line (exit code 2) when the Ray Client server at ``address`` refuses this process's token."""
    if address.startswith("ray://") and (problem := ray_client_token_problem(address)):
        raise ClusterError(f"--address: {problem}")

