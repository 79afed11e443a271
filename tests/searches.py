"""One real search for a module's tests (embedded Ray, Optuna, MLflow): plan, run, publish; then leave no Ray
behind."""

from __future__ import annotations

from pathlib import Path

from search.experiment import Experiment
from search.plan import make_plan
from search.publish import SearchResult, publish
from search.tune import run_search


def search_once(exp: Experiment, folder: Path, **plan: object) -> SearchResult:
    """The search of ``exp`` with its Ray storage under ``folder/ray``, quietly, published (registry, report; no
    export files); Ray is shut down after it, whatever happened, so the next module starts its own."""
    import ray

    try:
        planned = make_plan(exp, storage_path=folder / "ray", out=folder / f"{exp.name}.best.yaml", **plan)
        return publish(planned, run_search(planned, verbose=0))
    finally:
        ray.shutdown()
