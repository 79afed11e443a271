"""A search running on the cluster's head, shown live on the machine that started it through Ray Client.

``drcaps search --address ray://...`` runs the whole command as one Ray task on the head (runtime.run_on_head). Its
output used to come back only when the search ended. Now the head sends events as they happen, and the client
replays them:

- ``("text", "out" | "err", line)``: a line the command printed (with the head's MLflow address as published);
- ``("view", method, args)``: the live view's events (``open`` with its settings, ``started``/``result``/``ended``,
  ``close``), replayed into a :class:`~search.progress.SearchProgress` on the client: the same redrawn block on a
  terminal, one line per trial in a log, as a local search shows;
- ``("paths", {"out": ..., "experiment": ...})``: the head's temporary folders, shown as the client's own;
- :data:`END`, the last event of the task.

The head's side (:func:`sending`, :func:`send`, :class:`RelayedView`, :class:`LineStream`) knows nothing of Ray: the
sink it is given puts events on a Ray queue (runtime.py). The client's side is :class:`Shower`.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from search.progress import SearchProgress

Event = tuple[Any, ...]
END: Event = ("end",)
_SINKS: list[Callable[[Event], None]] = []     # where this process's events go (on the head, inside the task)


# ================================================================ the head's side

@contextlib.contextmanager
def sending(sink: Callable[[Event], None]) -> Iterator[None]:
    """Send this process's events (:func:`send`) to ``sink`` for the block."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def active() -> bool:
    """Whether this process's events go to a client (the search runs as a Ray Client's task on the head)."""
    return bool(_SINKS)


def send(*event: Any) -> None:
    """One event to the client, if any watches; never raises (a lost line must not stop a search)."""
    if _SINKS:
        with contextlib.suppress(Exception):
            _SINKS[-1](event)


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's result as the view reads it: its numbers and strings (no config, no checkpoint objects)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (numbers.Real, str)) and not isinstance(v, bool)}


class RelayedView:
    """The live view of a search whose client is elsewhere: each event is sent, nothing is shown here. The client
    builds ``SearchProgress(*settings, live=live)`` from the ``open`` event."""

    def __init__(self, total: int, metric: str, mode: str, max_epochs: int, names: list[str],
                 live: bool | None) -> None:
        self.settings = (total, metric, mode, max_epochs, list(names), live)

    def __enter__(self) -> RelayedView:
        send("view", "open", self.settings)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        send("view", "close", (exc_type is not None,))

    def started(self, key: str, number: int, params: Mapping[str, Any]) -> None:
        send("view", "started", (key, number, dict(params)))

    def result(self, key: str, metrics: Mapping[str, Any]) -> None:
        send("view", "result", (key, _plain(metrics)))

    def ended(self, key: str, outcome: str, error: str | None = None) -> None:
        send("view", "ended", (key, outcome, error))


class LineStream(io.StringIO):
    """A text stream that keeps what is written (``getvalue``) and sends each complete line as ``("text", name,
    transform(line))``; :meth:`close_lines` sends what is left without a newline."""

    def __init__(self, name: str, transform: Callable[[str], str] = lambda s: s) -> None:
        super().__init__()
        self.name, self.transform, self._partial = name, transform, ""

    def write(self, s: str) -> int:
        n = super().write(s)
        *lines, self._partial = (self._partial + s).split("\n")
        for line in lines:
            send("text", self.name, self.transform(line + "\n"))
        return n

    def close_lines(self) -> None:
        if self._partial:
            send("text", self.name, self.transform(self._partial))
            self._partial = ""


# ================================================================ the client's side

class Shower:
    """Replays a head's events here: lines to this process's stdout/stderr (the head's temporary folders written
    as ``here``'s), the live view into a SearchProgress of its own. ``streamed``: whether any line came."""

    def __init__(self, here: Mapping[str, str]) -> None:
        self.here, self.there = dict(here), {}
        self.view: SearchProgress | None = None
        self.streamed = False

    def rewrite(self, text: str) -> str:
        for kind, path in self.there.items():
            if kind in self.here:
                text = text.replace(path, self.here[kind])
        return text

    def __call__(self, event: Event) -> None:
        kind, *rest = event
        if kind == "text":
            name, line = rest
            stream = sys.stdout if name == "out" else sys.stderr     # looked up now: a live block redirects it
            stream.write(self.rewrite(line))
            stream.flush()
            self.streamed = True
        elif kind == "paths":
            self.there = dict(rest[0])
        elif kind == "view":
            self._view(*rest)

    def _view(self, method: str, args: tuple[Any, ...]) -> None:
        if method == "open":
            *settings, live = args
            self.close(interrupted=False)
            self.view = SearchProgress(*settings, stream=sys.stdout, live=live)
            self.view.__enter__()
        elif method == "close":
            self.close(interrupted=bool(args[0]))
        elif self.view is not None:
            getattr(self.view, method)(*args)
            if method == "ended":
                self.streamed = True

    def close(self, interrupted: bool) -> None:
        """Close the view shown here (``interrupted``: as when the search was stopped, trials left as they were)."""
        if self.view is not None:
            view, self.view = self.view, None
            view.__exit__(KeyboardInterrupt if interrupted else None, None, None)
