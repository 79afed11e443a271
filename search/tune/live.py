"""The live view's link to Ray Tune: a Tune callback that forwards trial events (started, result, ended) to the
live view of the search running in this process: a :class:`~search.progress.SearchProgress` shown here, or, when
this process is a Ray Client's task on the cluster's head, a :class:`~search.tune.relay.RelayedView` that sends the
events to the client, which shows them (search/tune/relay.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from search.progress import SearchProgress
from search.tune import relay
from search.tune.searcher import split_config
from search.tune.trial import FAILURE_KEY

View = SearchProgress | relay.RelayedView
_SHOWN: list[View] = []   # the live view of the search running in this process (at most one)


def make_view(total: int, metric: str, mode: str, max_epochs: int, names: list[str], verbose: int) -> View | None:
    """The live view of a search: none at ``verbose`` 0; the redrawn block on a terminal at 1 (one line per trial
    elsewhere), lines at 2 and up; sent to the Ray Client that started the search when there is one."""
    if verbose < 1:
        return None
    live = None if verbose == 1 else False
    if relay.active():
        return relay.RelayedView(total, metric, mode, max_epochs, names, live)
    return SearchProgress(total, metric, mode, max_epochs, names, live=live)


@contextlib.contextmanager
def showing(view: View | None) -> Iterator[None]:
    """Show ``view`` (entered as a context) for the block and route this process's trial events to it. Tune pickles
    its callbacks with the experiment state and restores them on ``--resume``, so the callback cannot hold the view
    itself: it asks :func:`current` at each event."""
    if view is None:
        yield
        return
    _SHOWN.append(view)
    try:
        with view:
            yield
    finally:
        _SHOWN.remove(view)


def current() -> View | None:
    """The live view of the search running in this process, if any."""
    return _SHOWN[-1] if _SHOWN else None


def progress_callback(max_epochs: int) -> Any:
    """A Tune callback that forwards trial events to this process's live view (:func:`current`). It holds no
    reference to it, so Tune can pickle it with the experiment state and a resumed search shows its own view."""
    from ray.tune import Callback

    view = current

    def error_line(trial: Any) -> str:
        err = getattr(trial, "error_message", None) or ""
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        return lines[-1][:160] if lines else "error"

    class DrcapsProgress(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                params, number = split_config(dict(trial.config))
                v.started(trial.trial_id, number if number is not None else len(v.trials), params)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if (v := view()) is not None:
                v.result(trial.trial_id, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                epochs = int((trial.last_result or {}).get("epoch", 0))
                if failure := (trial.last_result or {}).get(FAILURE_KEY):
                    v.ended(trial.trial_id, "failed", str(failure))
                    return
                v.ended(trial.trial_id, "finished" if epochs >= max_epochs else "stopped_early")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                v.ended(trial.trial_id, "failed", error_line(trial))

    return DrcapsProgress()
