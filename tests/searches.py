"""One real search for a module's tests (embedded Ray, Optuna, MLflow): run it, then leave no Ray behind."""

from __future__ import annotations

from pathlib import Path

from search.experiment import Experiment
from search.tune import SearchResult, run_search


def search_once(exp: Experiment, folder: Path) -> SearchResult:
    """``run_search`` of ``exp`` with its Ray storage under ``folder/ray``, quietly; Ray is shut down after it,
    whatever happened, so the next module starts its own."""
    import ray

    try:
        return run_search(exp, storage_path=folder / "ray", verbose=0)
    finally:
        ray.shutdown()
