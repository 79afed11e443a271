"""A trial Tune killed before its end-of-trial upload keeps its best checkpoint: the driver uploads it from the
worker's leftover folder (search/tune/rescue.py), on a real MLflow store."""

from __future__ import annotations

import tempfile
from pathlib import Path

from search import tracking
from search.tune.rescue import rescue_best_checkpoints


def test_a_run_without_best_pt_gets_it_from_the_workers_leftover_folder(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_search_run(uri, "rescue", run_name="s", params={}, tags={})
    ids = {}
    for trial_id in ("cut0001", "done0002", "gone0003"):
        ids[trial_id] = tracking.find_or_create_trial_run(uri, "rescue", parent_run_id=parent, trial_id=trial_id,
                                                          run_name=trial_id, params={})
    uploaded = tmp_path / "best.pt"
    uploaded.write_bytes(b"uploaded by the trial")
    tracking.log_run_artifact(uri, ids["done0002"], uploaded, "checkpoint")
    with tempfile.TemporaryDirectory(prefix="drcaps-cut0001-", dir=tempfile.gettempdir()) as work:
        (Path(work) / "best.pt").write_bytes(b"left behind by the killed worker")
        rescued = rescue_best_checkpoints(uri, tracking.child_runs(uri, parent))
    assert rescued == ["cut0001"]                                    # uploaded runs and runs without a folder: no
    assert tracking.has_artifact(uri, ids["cut0001"], "checkpoint/best.pt")
    assert not tracking.has_artifact(uri, ids["gone0003"], "checkpoint/best.pt")
    got = tracking.download_artifacts(uri, ids["cut0001"], "checkpoint/best.pt", tmp_path / "dl")
    assert got.read_bytes() == b"left behind by the killed worker"
