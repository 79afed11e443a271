"""What Ray Tune's driver keeps per trial, cut to what a drcaps search reads back, so the driver's memory grows
less with every trial (issue 9, benchmarks/search_scale.py: 23 KiB of Python memory per ended trial instead of 91).

Tune keeps every trial's state in the driver until ``fit`` returns. Two parts of it grow with every trial and are
never read by drcaps (the ranking is search/ranking.py's, from each trial's reported epochs):

- per numeric key of every result, min/max/avg/last and two deques (last 5, last 10): ``run_metadata``'s
  ``metric_analysis`` and ``metric_n_steps``, and the cached JSON of them. Only ``ExperimentAnalysis.get_best_trial``
  with a scope other than "last" reads them. :class:`DropEndedTrialStats` clears them when a trial ends;
- one tensorboardX writer per trial (Tune's TBX logger) and a CSV file per trial, next to the JSON results file
  that Tune's ``ExperimentAnalysis`` reads back (``metrics_dataframe``). :data:`LEAN_ENV` turns Tune's automatic
  loggers off and :func:`lean_callbacks` puts the JSON one back. A user who wants Tune's TensorBoard and CSV files
  sets ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` (their value is kept).
"""

from __future__ import annotations

from typing import Any

# Read by Tune in fit() (ray/tune/utils/callback.py): no automatic CSV, JSON and TensorBoard loggers.
LEAN_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def _drop_stats(trial: Any) -> None:
    meta = trial.run_metadata
    meta.metric_analysis.clear()
    meta.metric_n_steps.clear()
    meta.invalidate_cache()              # its cached JSON (Tune's experiment snapshots) is rebuilt without them
    trial.invalidate_json_state()


def lean_callbacks() -> list[Any]:
    """The Tune callbacks a search runs with besides its own: the JSON results logger (what ``metrics_dataframe``
    reads) and :class:`DropEndedTrialStats`."""
    from ray.tune import Callback
    from ray.tune.logger import JsonLoggerCallback

    class DropEndedTrialStats(Callback):
        """Clears an ended trial's per-key result statistics, which drcaps never reads (see the module)."""

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _drop_stats(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _drop_stats(trial)

    return [JsonLoggerCallback(), DropEndedTrialStats()]
