"""The live view of a search: one compact block a person can watch, fed by trial events; no Ray, no MLflow.

``SearchProgress`` keeps the state of every trial (running, finished, stopped early, failed), the best so far and
the last trials to end, and shows it as it changes:

- on a terminal, one block redrawn in place (``rich.live.Live``): counts of N, elapsed and ETA, the best trial
  with its metric and searched parameters, the last few trials to end;
- elsewhere (a log file, CI, a pipe), one line per trial that ends, so a captured log stays short and readable.

``tune.py`` forwards Ray Tune's callbacks to ``started`` / ``result`` / ``ended``; tests call them directly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from search import ranking

OUTCOMES: tuple[str, ...] = ("finished", "stopped_early", "failed")
RECENT = 4                                 # trials shown under "last ended"


@dataclass
class TrialState:
    number: int
    params: dict[str, Any]
    epoch: int = 0
    value: float | None = None             # the best value of the metric over the epochs so far
    outcome: str = "running"               # running | finished | stopped_early | failed
    error: str | None = None


def short_name(dotted: str) -> str:
    """``train.lr`` -> ``lr``, ``model.routing_iterations`` -> ``routing_iterations``."""
    return dotted.rsplit(".", 1)[-1]


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_params(params: Mapping[str, Any], names: Sequence[str] | None = None) -> str:
    """``lr=0.3 momentum=0.9 units=16``: the searched parameters, in the space's order, by their short names."""
    keys = [k for k in (names or params) if k in params]
    return " ".join(f"{short_name(k)}={format_value(params[k])}" for k in keys)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class SearchProgress:
    """State and rendering of a running search. ``live``: redraw a block in place (default: when ``stream`` is a
    terminal); otherwise print one line per trial that ends."""

    total: int
    metric: str
    mode: str
    max_epochs: int
    names: Sequence[str] = ()
    stream: IO[str] = field(default_factory=lambda: sys.stdout)
    live: bool | None = None
    clock: Callable[[], float] = time.monotonic
    trials: dict[str, TrialState] = field(default_factory=dict)
    ended_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._live: Any = None
        self._announced_best: int | None = None

    # ------------------------------------------------------------ events

    def started(self, key: str, number: int, params: Mapping[str, Any]) -> None:
        if key not in self.trials:                      # a restarted trial keeps its state
            self.trials[key] = TrialState(number, dict(params))
        else:
            self.trials[key].outcome = "running"
        self._refresh()

    def result(self, key: str, metrics: Mapping[str, Any]) -> None:
        t = self.trials.get(key)
        if t is None:
            return
        t.epoch = int(metrics.get("epoch", t.epoch))
        value = metrics.get(self.metric)
        if isinstance(value, int | float) and ranking.better(float(value), t.value, self.mode):
            t.value = float(value)
        self._refresh()

    def ended(self, key: str, outcome: str, error: str | None = None) -> None:
        t = self.trials.get(key)
        if t is None or outcome not in OUTCOMES:
            return
        t.outcome, t.error = outcome, error
        if key in self.ended_order:
            self.ended_order.remove(key)
        self.ended_order.append(key)
        if self.live:
            self._refresh()
            return
        print(self.line_for(key), file=self.stream, flush=True)
        best = self.best()
        if best is not None and best.number != self._announced_best:
            self._announced_best = best.number
            print(f"      new best: trial {best.number}  {format_params(best.params, self.names)}", file=self.stream,
                  flush=True)

    # ------------------------------------------------------------ what is shown

    def counts(self) -> dict[str, int]:
        out = {"running": 0, **{o: 0 for o in OUTCOMES}}
        for t in self.trials.values():
            out[t.outcome] += 1
        return out

    def best(self) -> TrialState | None:
        """The best trial that has not failed (the lower number on ties), by ``search.ranking``."""
        scored = sorted((t for t in self.trials.values() if t.outcome != "failed"), key=lambda t: t.number)
        return ranking.best_of(scored, lambda t: t.value, self.mode)

    def eta_s(self) -> float | None:
        """Remaining time, from the pace so far in trial-epochs (a stopped trial costs what it ran)."""
        elapsed = self.clock() - self.started_at
        spent = sum(t.epoch for t in self.trials.values())
        ended = sum(1 for t in self.trials.values() if t.outcome != "running")
        if spent == 0 or ended == 0:
            return None
        per_trial = sum(t.epoch for t in self.trials.values() if t.outcome != "running") / ended
        left = max(0.0, (self.total - ended) * per_trial - sum(t.epoch for t in self.trials.values()
                                                              if t.outcome == "running"))
        return elapsed * left / spent

    def status_line(self) -> str:
        c = self.counts()
        done = c["finished"] + c["stopped_early"] + c["failed"]
        eta = self.eta_s()
        timing = f"{format_duration(self.clock() - self.started_at)} elapsed" + (
            f", ETA {format_duration(eta)}" if eta is not None and done < self.total else "")
        return (f"[{done}/{self.total}] finished {c['finished']}  stopped {c['stopped_early']}  failed {c['failed']}"
                f"  running {c['running']}  |  {timing}")

    def best_line(self) -> str:
        b = self.best()
        if b is None:
            return f"best {self.metric}: -"
        return f"best {self.metric} {b.value:.4f}  trial {b.number}  {format_params(b.params, self.names)}"

    def line_for(self, key: str) -> str:
        """``[3/10] trial 2 stopped at epoch 2: val_acc 0.9611   best 0.9833 (trial 0)   running 2   0:45, ETA 1:30``"""
        t = self.trials[key]
        c = self.counts()
        done = c["finished"] + c["stopped_early"] + c["failed"]
        what = {"finished": "finished", "stopped_early": f"stopped at epoch {t.epoch}",
                "failed": f"FAILED at epoch {t.epoch}"}[t.outcome]
        value = "-" if t.value is None else f"{t.value:.4f}"
        detail = f" ({t.error})" if t.error else ""
        b = self.best()
        best = f"best {b.value:.4f} (trial {b.number})" if b is not None and b.value is not None else "best -"
        eta = self.eta_s()
        timing = format_duration(self.clock() - self.started_at) + (
            f", ETA {format_duration(eta)}" if eta is not None and done < self.total else "")
        return (f"[{done}/{self.total}] trial {t.number} {what}: {self.metric} {value}{detail}   {best}   "
                f"running {c['running']}   {timing}")

    def lines(self) -> list[str]:
        """The block shown on a terminal."""
        out = [self.status_line(), self.best_line()]
        running = sorted((t for t in self.trials.values() if t.outcome == "running"), key=lambda t: t.number)
        for t in running:
            value = "-" if t.value is None else f"{t.value:.4f}"
            out.append(f"  running  trial {t.number:<3} epoch {t.epoch}/{self.max_epochs}  {self.metric} {value}  "
                       f"{format_params(t.params, self.names)}")
        for key in self.ended_order[-RECENT:][::-1]:
            t = self.trials[key]
            value = "-" if t.value is None else f"{t.value:.4f}"
            label = {"finished": "finished", "stopped_early": "stopped ", "failed": "failed  "}[t.outcome]
            out.append(f"  {label} trial {t.number:<3} epoch {t.epoch}/{self.max_epochs}  {self.metric} {value}  "
                       f"{format_params(t.params, self.names)}")
        return out

    # ------------------------------------------------------------ terminal

    def _refresh(self) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(self.lines())))

    def __enter__(self) -> SearchProgress:
        if self.live:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._live = Live(Text("\n".join(self.lines())), console=Console(file=self.stream),
                              refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:        # the search is over (e.g. its time budget): what still ran was stopped
            for key, t in self.trials.items():
                if t.outcome == "running":
                    self.ended(key, "stopped_early")
        if self._live is not None:
            self._refresh()
            self._live.__exit__(None, None, None)
            self._live = None
