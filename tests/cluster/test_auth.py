"""search/cluster_auth.py without a server: the credentials MLflow's client would send, read from the environment
as MLflow reads them, and the head's MLflow address rewritten as a person's machine reaches it. The servers' answers
(401 without or with a wrong login, a refused Ray token) are exercised against the real stack in test_compose.py."""

from __future__ import annotations

import base64

import pytest

from search.cluster_auth import as_published, check_mlflow_login, mlflow_headers


def test_basic_auth_from_mlflow_tracking_username_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ana")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret:with-colon")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "ignored-when-a-user-is-set")
    header = mlflow_headers()["Authorization"]
    assert header.startswith("Basic ")
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "ana:s3cret:with-colon"


def test_a_bearer_token_alone_and_nothing_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert mlflow_headers() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ana")             # a user without a password is not a login
    assert mlflow_headers() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    assert mlflow_headers() == {"Authorization": "Bearer tok"}


def test_only_http_servers_are_asked_for_a_login(tmp_path) -> None:
    check_mlflow_login(f"sqlite:///{tmp_path}/mlflow.db")             # no server, nothing to ask, nothing made
    assert list(tmp_path.iterdir()) == []


def test_the_head_s_mlflow_address_as_published(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "search run (MLflow):  http://mlflow:5000/#/experiments/1/runs/abc\n--tracking-uri http://mlflow:5000\n"
    monkeypatch.delenv("DRCAPS_MLFLOW_PUBLIC_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000/")
    assert as_published(text) == text                                  # nothing published: unchanged
    monkeypatch.setenv("DRCAPS_MLFLOW_PUBLIC_URL", "http://127.0.0.1:15000/")
    assert as_published(text) == text.replace("http://mlflow:5000", "http://127.0.0.1:15000")


def test_the_optuna_dashboard_line_says_where_a_stack_s_database_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.publish.outputs import dashboard_line

    url = "postgresql+psycopg2://optuna:s3cret@postgres:5432/optuna"
    monkeypatch.delenv("DRCAPS_MLFLOW_PUBLIC_URL", raising=False)
    assert "pip install optuna-dashboard" in dashboard_line(url) and "s3cret" not in dashboard_line(url)
    monkeypatch.setenv("DRCAPS_MLFLOW_PUBLIC_URL", "http://127.0.0.1:15000")      # a node of the compose stack
    line = dashboard_line(url)
    assert "cluster's network" in line and "s3cret" not in line, line
    assert "pip install" in dashboard_line("sqlite:////work/optuna.db")          # a file: as everywhere
