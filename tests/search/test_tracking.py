"""search/tracking/ against a real MLflow 3.17.2: a SQLite store in tmp (shared per module), and one real server."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from search import tracking
from search.tracking import TrackingError
from tests.servers import free_port, mlflow_server

EXP = "drcaps-test"
# trial -> per-epoch (val_acc, val_loss), status. t1 peaks at 0.95 but its LAST val_acc is 0.8; the failed t2 has
# the lowest val_loss and must not win.
TRIALS = {
    "t_00000": ([(0.5, 1.0), (0.7, 0.6), (0.9, 0.3)], "FINISHED"),
    "t_00001": ([(0.6, 0.9), (0.95, 0.2), (0.8, 0.15)], "KILLED"),
    "t_00002": ([(0.3, 0.5), (0.4, 0.1)], "FAILED"),
}




@pytest.fixture(scope="module", autouse=True)
def empty_cwd(tmp_path_factory: pytest.TempPathFactory):
    """Run from an empty folder and check that nothing (a stray ./mlflow.db, ./mlruns) was written there."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd
    assert sorted(os.listdir(cwd)) == [], "tracking wrote to the working directory (global MLflow state?)"


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = tracking.resolve_tracking_uri(None, tmp_path_factory.mktemp("store") / "mlflow")
    tracking.check_tracking_uri(uri)                  # creates the folder
    return uri


def _run_search(uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    parent = tracking.start_search_run(
        uri, experiment, run_name="search-1",
        params={"train.lr": 1.0e-3, "model.routing_iterations": 3, "data.sizes": [64, 128], "search.long": "x" * 9000},
        tags={"git.commit": "abc123"},
        artifacts={"experiment.yaml": "name: test\n", "search_space.json": '{"train.lr": {}}', "sub/raw.bin": b"\0\1"})
    runs = {}
    for i, (trial_id, (epochs, status)) in enumerate(TRIALS.items()):
        params = {"train.lr": 10.0 ** -(i + 2), "model.routing_iterations": i + 1}
        run_id = tracking.find_or_create_trial_run(uri, experiment, parent_run_id=parent, trial_id=trial_id,
                                                   run_name=f"trial_{i}", params=params)
        logger = tracking.TrialLogger(uri, run_id)
        for epoch, (acc, loss) in enumerate(epochs, start=1):
            if epoch == 2:    # the attempt crashes, Ray restarts the trial: same run, same params logged again
                logger.end("FAILED", reason="OSError: node lost")
                again = tracking.find_or_create_trial_run(uri, experiment, parent_run_id=parent, trial_id=trial_id,
                                                          run_name=f"trial_{i}", params=params)
                assert again == run_id
            logger.log_epoch({"val_acc": acc, "val_loss": loss, "epoch": epoch, "lr": torch.tensor(0.1),
                              "nan": math.nan, "note": "text"}, step=epoch)
        logger.set_tags({"drcaps.device": "cpu"})
        logger.end(status, reason="RuntimeError: boom" if status == "FAILED" else None)
        runs[trial_id] = run_id
    return parent, runs


@pytest.fixture(scope="module")
def search(uri: str) -> tuple[str, dict[str, str]]:
    return _run_search(uri, EXP)


def test_resolve_tracking_uri_makes_paths_absolute(tmp_path: Path) -> None:
    assert tracking.resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///runs/m.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/m.db"
    assert tracking.resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{Path.cwd().resolve()}/m.db"
    assert tracking.resolve_tracking_uri("sqlite:///m.db?timeout=30", tmp_path).endswith("/m.db?timeout=30")
    assert tracking.resolve_tracking_uri("mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    for kept in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "https://x.org/mlflow", "databricks"):
        assert tracking.resolve_tracking_uri(kept, tmp_path) == kept


def test_check_tracking_uri_fails_fast_on_a_closed_port() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking\.uri: cannot reach {uri}: .*mlflow server"):
        tracking.check_tracking_uri(uri, timeout_s=2.0)
    assert time.monotonic() - start < 2.5


def test_check_tracking_uri_rejects_unshareable_stores(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="absolute"):
        tracking.check_tracking_uri("sqlite:///relative.db")
    with pytest.raises(TrackingError, match="file store"):
        tracking.check_tracking_uri(f"file://{tmp_path}/mlruns")
    tracking.check_tracking_uri(f"sqlite:///{tmp_path}/new/dir/mlflow.db")   # creatable: fine, and not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrackingError, match="afile is a file"):
        tracking.check_tracking_uri(f"sqlite:///{tmp_path}/afile/mlflow.db")
    with pytest.raises(TrackingError, match="unknown scheme"):
        tracking.check_tracking_uri("foo://host/db")


def test_parent_run_holds_params_tags_artifacts(uri: str, search: tuple[str, dict[str, str]]) -> None:
    parent, _ = search
    [record] = [r for r in [tracking.latest_search_run(uri, EXP)] if r is not None]
    assert record.run_id == parent and record.status == "RUNNING" and record.tags["drcaps.role"] == "search"
    assert record.params["train.lr"] == "0.001" and record.params["data.sizes"] == "[64, 128]"
    assert len(record.params["search.long"]) == tracking.MAX_PARAM_VALUE
    assert record.params["search.long"].endswith("[truncated 9000 chars]")
    assert record.tags["git.commit"] == "abc123"
    root = Path(record.artifact_uri.removeprefix("file://"))                  # <exp dir>/<run id>/artifacts
    assert root.parents[1] == Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / EXP
    assert (root / "experiment.yaml").read_text() == "name: test\n"
    assert (root / "sub" / "raw.bin").read_bytes() == b"\0\1"


def test_trial_runs_are_children_with_history_status_and_outcome(uri: str, search: tuple[str, dict[str, str]]) -> None:
    parent, runs = search
    children = {r.tags["drcaps.trial_id"]: r for r in tracking.child_runs(uri, parent)}
    assert sorted(children) == sorted(TRIALS)                     # the restarts made no duplicates
    assert {r.run_id for r in children.values()} == set(runs.values())
    outcomes = {"FINISHED": "finished", "KILLED": "stopped_early", "FAILED": "failed"}
    for trial_id, (epochs, status) in TRIALS.items():
        r = children[trial_id]
        assert r.tags["mlflow.parentRunId"] == parent and r.tags["drcaps.role"] == "trial"
        assert r.status == status and r.tags["drcaps.outcome"] == outcomes[status]
        assert r.tags["drcaps.restarts"] == "1" and r.tags["drcaps.restart_reason"] == "OSError: node lost"
        assert r.tags["drcaps.device"] == "cpu"
        assert {"train.lr", "model.routing_iterations"} <= set(r.params)
        assert set(r.metrics) == {"val_acc", "val_loss", "epoch", "lr"}    # nan and text were skipped
        assert tracking.metric_history(uri, r.run_id, "val_acc") == [(e, a) for e, (a, _) in enumerate(epochs, 1)]
        assert r.metrics["val_acc"] == epochs[-1][0]                       # the last value, not the best
    assert children["t_00002"].tags["drcaps.failure_reason"] == "RuntimeError: boom"
    assert "drcaps.failure_reason" not in children["t_00000"].tags


def test_best_trial_run_ranks_by_the_best_epoch_for_max_and_min(uri: str, search: tuple[str, dict[str, str]]) -> None:
    """The one ranking (search/ranking.py): t1 peaked at 0.95 then declined to 0.8; t0 ended at 0.9. t1 is best,
    and the record's metrics are those of its best epoch (2), not its last."""
    parent, runs = search
    best = tracking.best_trial_run(uri, EXP, "val_acc", "max")
    assert best.run_id == runs["t_00001"] and best.metrics["val_acc"] == 0.95 and best.metrics["epoch"] == 2
    assert tracking.best_trial_run(uri, EXP, "val_loss", "min", parent_run_id=parent).run_id == runs["t_00001"]
    with pytest.raises(TrackingError, match="'val_f1'.*metrics logged: \\['epoch', 'lr', 'val_acc', 'val_loss'\\]"):
        tracking.best_trial_run(uri, EXP, "val_f1", "max")
    with pytest.raises(TrackingError, match="no MLflow experiment named 'nope'"):
        tracking.best_trial_run(uri, "nope", "val_acc", "max")
    with pytest.raises(TrackingError, match="no MLflow run 'f00d'"):
        tracking.best_trial_run(uri, EXP, "val_acc", "max", parent_run_id="f00d")
    empty = tracking.start_search_run(uri, "empty", run_name="s", params={}, tags={})
    with pytest.raises(TrackingError, match="none of its 0 trial runs"):
        tracking.best_trial_run(uri, "empty", "val_acc", "max")
    assert tracking.latest_search_run(uri, "empty").run_id == empty
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'maximum'"):
        tracking.best_trial_run(uri, EXP, "val_acc", "maximum")


def test_trials_dataframe_has_one_row_per_trial(uri: str, search: tuple[str, dict[str, str]]) -> None:
    parent, runs = search
    df = tracking.trials_dataframe(uri, parent)
    assert len(df) == 3 and sorted(df["trial_id"]) == sorted(TRIALS)
    assert {"run_id", "status", "outcome", "params.train.lr", "params.model.routing_iterations",
            "metrics.val_acc"} <= set(df.columns)
    row = df.set_index("trial_id").loc["t_00001"]
    assert row["run_id"] == runs["t_00001"] and row["outcome"] == "stopped_early" and row["metrics.val_acc"] == 0.8


def test_retry_backs_off_only_on_a_locked_database() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.with_retry(flaky) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError, match="database is locked"):     # gives up after `attempts` calls
        tracking.with_retry(flaky, attempts=2)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(KeyError):                                        # any other error: raised at once
        tracking.with_retry(lambda: calls.append(1) or {}["missing"])
    assert len(calls) == 1


def test_end_run_rejects_unknown_status(uri: str, search: tuple[str, dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="status must be one of"):
        tracking.end_run(uri, search[0], "DONE")


class TinyCaps(nn.Module):
    """Stand-in for CapsNetClassifier: x (B, 4) -> capsule lengths (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3 * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.proj(x).view(-1, 3, 2)                    # (B, 3, 2)
        return v.norm(dim=-1)                               # (B, 3)


class TupleOut(TinyCaps):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x


def test_registered_model_loads_back_and_predicts_the_same(uri: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    parent = tracking.start_search_run(uri, "models", run_name="s", params={}, tags={})
    run_id = tracking.find_or_create_trial_run(uri, "models", parent_run_id=parent, trial_id="t", run_name="t",
                                               params={})
    torch.manual_seed(0)
    model, x = TinyCaps().train(), torch.randn(7, 4)
    model_uri = tracking.log_and_register_model(uri, run_id, model, x[:2], registered_name="tiny-caps")
    assert model_uri == "models:/tiny-caps@best"
    assert model.training and not mlflow.is_tracking_uri_set()    # caller's model and MLflow's globals untouched
    loaded = tracking.load_model(uri, model_uri)
    assert isinstance(loaded, TinyCaps) and not loaded.training     # a pickled nn.Module, not a pt2 graph
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))     # batch 7 though the example had 2
    second = tracking.log_and_register_model(uri, run_id, model, x[:2], registered_name="tiny-caps")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert second == model_uri and str(client.get_model_version_by_alias("tiny-caps", "best").version) == "2"
    assert tracking.model_version(uri, "tiny-caps", "best")["version"] == "2"
    assert tracking.run_version(uri, "tiny-caps", run_id) == "2"                 # the newest of the run's versions
    assert tracking.run_version(uri, "tiny-caps", parent) is None                # no version from that run
    assert tracking.run_version(uri, "no-such-model", run_id) is None
    assert isinstance(tracking.load_model(uri, "models:/tiny-caps/1"), TinyCaps)
    model_dir = Path(client.get_model_version_download_uri("tiny-caps", "2").removeprefix("file://"))
    assert (model_dir / "data" / "model.pth").is_file()                # pickle format, no model.pt2
    info = mlflow.models.Model.load(model_dir / "MLmodel")
    assert info.signature.inputs.inputs[0].shape == (-1, 4) and info.signature.outputs.inputs[0].shape == (-1, 3)
    assert info.flavors["pytorch"] and info.saved_input_example_info is not None
    with pytest.raises(TypeError, match="must return one tensor"):
        tracking.log_and_register_model(uri, run_id, TupleOut(), x[:2], registered_name="tiny-caps")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on a free local port, backed by SQLite in tmp; always terminated."""
    root = tmp_path_factory.mktemp("server")
    with mlflow_server(f"sqlite:///{root}/mlflow.db", root, "--artifacts-destination", str(root / "artifacts"),
                       timeout_s=90) as base:
        yield base


@pytest.mark.slow
def test_search_over_a_real_tracking_server(server: str) -> None:
    tracking.check_tracking_uri(server)
    parent, runs = _run_search(server, EXP)
    assert len(tracking.child_runs(server, parent)) == 3
    assert tracking.best_trial_run(server, EXP, "val_acc", "max").run_id == runs["t_00001"]   # best epoch 0.95
    assert tracking.metric_history(server, runs["t_00001"], "val_acc") == [(1, 0.6), (2, 0.95), (3, 0.8)]
    record = tracking.latest_search_run(server, EXP)
    assert record is not None and record.artifact_uri.startswith("mlflow-artifacts:/")
    model, x = TinyCaps().eval(), torch.randn(3, 4)
    model_uri = tracking.log_and_register_model(server, runs["t_00000"], model, x[:2], registered_name="srv-caps")
    with torch.no_grad():
        torch.testing.assert_close(tracking.load_model(server, model_uri)(x), model(x))


@pytest.mark.parametrize(("content", "said"), [
    (b"id,name\n1,a\n" * 300, "is not a readable database (file is not a database)"),
    (b"SQLite format 3\x00\x10\x00\x01\x01" + b"\xab" * 8000, "move it aside"),
])
def test_the_client_of_a_file_that_is_not_a_store_is_one_line(tmp_path: Path, content: bytes, said: str) -> None:
    """Past the up-front checks (a file replaced between check and use), opening the store still says which store
    and what to do in one TrackingError line, and leaves the file as it was."""
    from search.tracking.client import mlflow_client

    db = tmp_path / "mlflow.db"
    db.write_bytes(content)
    uri = f"sqlite:///{db}"
    with pytest.raises(TrackingError) as info:
        mlflow_client(uri)
    message = str(info.value)
    assert message.startswith(f"tracking.uri: the MLflow store {uri} ") and said in message and "\n" not in message
    assert db.read_bytes() == content and sorted(tmp_path.iterdir()) == [db]
