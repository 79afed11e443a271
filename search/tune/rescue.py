"""What a trial's worker could not finish because Tune ended it first: at the end of a search Tune stops the
trials still in its hands and, 5 s later, kills their workers (``TuneController._cleanup_trials``, a fixed wait). A
trial the scheduler stopped last uploads its best checkpoint only after that stop, so under load the kill can cut
the upload, and the trial's run is left without ``checkpoint/best.pt`` (the registry and the report read it).

The worker's folder (``<tmp>/drcaps-<trial id>-*``, search/tune/trial.py) still holds ``best.pt`` when the kill cut
it short: its own clean-up never ran. On the driver's machine (a local search, or the head for trials it ran) the
driver uploads it before the folders are removed. Trials on other nodes are not rescued (docs/notes.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from drcapsnet.checkpoint import BEST
from search import tracking


def rescue_best_checkpoints(uri: str, runs: list[tracking.RunRecord]) -> list[str]:
    """Upload ``best.pt`` from this machine's leftover worker folder of every trial run that lacks it; the trial
    ids rescued."""
    rescued = []
    for r in runs:
        trial_id = r.tags.get("drcaps.trial_id")
        if not trial_id or tracking.has_artifact(uri, r.run_id, f"checkpoint/{BEST}"):
            continue
        found = sorted(Path(tempfile.gettempdir()).glob(f"drcaps-{trial_id}-*/{BEST}"))
        if found:
            tracking.log_run_artifact(uri, r.run_id, found[-1], "checkpoint")
            rescued.append(trial_id)
    return rescued
