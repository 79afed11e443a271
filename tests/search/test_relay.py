"""search/tune/relay.py: a search's lines and live view, sent from the cluster's head and shown on the Ray Client's
machine as a local search shows them (no Ray here: the events go through a list, as runtime.run_on_head's queue
carries them; tests/search/test_cluster.py runs the real path)."""

from __future__ import annotations

import contextlib
import io
import pickle

import pytest

from search.progress import SearchProgress
from search.tune import live, relay

SETTINGS = (3, "val_acc", "max", 2, ["train.lr"])


def _drive(view: object) -> None:
    """A search's trial events, as Tune's callback hands them to the live view."""
    with live.showing(view):  # type: ignore[arg-type]
        v = live.current()
        assert v is view
        v.started("a", 0, {"train.lr": 0.01})
        v.started("b", 1, {"train.lr": 0.02})
        v.result("a", {"epoch": 1, "val_acc": 0.5, "config": {"train.lr": 0.01}, "done": False})
        v.result("a", {"epoch": 2, "val_acc": 0.75})
        v.ended("a", "finished")
        v.result("b", {"epoch": 1, "val_acc": 0.25})
        v.ended("b", "stopped_early")


def test_a_relayed_view_shows_on_the_client_what_a_local_view_shows(capsys: pytest.CaptureFixture[str]) -> None:
    local = SearchProgress(*SETTINGS, stream=io.StringIO(), live=False, clock=lambda: 0.0)
    _drive(local)
    assert local.stream.getvalue().count("trial") >= 2      # type: ignore[attr-defined]

    events: list[relay.Event] = []
    with relay.sending(events.append):
        head_view = live.make_view(*SETTINGS, verbose=2)
        assert isinstance(head_view, relay.RelayedView)
        _drive(head_view)
    events = pickle.loads(pickle.dumps(events))               # what crosses to the client is plain data
    shower = relay.Shower({})
    for event in events:
        shower(event)
        if shower.view is not None:                           # the same clock as the local view's
            shower.view.clock, shower.view.started_at = (lambda: 0.0), 0.0
    assert capsys.readouterr().out == local.stream.getvalue()  # type: ignore[attr-defined]
    assert shower.view is None and shower.streamed


def test_without_a_client_the_view_is_shown_here_and_nothing_is_sent() -> None:
    assert not relay.active()
    view = live.make_view(*SETTINGS, verbose=1)
    assert isinstance(view, SearchProgress)
    assert live.make_view(*SETTINGS, verbose=0) is None
    relay.send("text", "out", "lost\n")                      # no sink: nothing happens, nothing raises


def test_lines_are_sent_whole_with_the_head_paths_shown_as_the_clients(capsys: pytest.CaptureFixture[str]) -> None:
    events: list[relay.Event] = []
    with relay.sending(events.append):
        relay.send("paths", {"out": "/tmp/drcaps-out-x", "experiment": "/tmp/drcaps-exp-y"})
        out = relay.LineStream("out", lambda s: s.replace("http://mlflow:5000", "http://127.0.0.1:5000"))
        with contextlib.redirect_stdout(out):
            print("exported best config: /tmp/drcaps-out-x/q.best.yaml", end="")
            print(" (run http://mlflow:5000/#/x)")
            print("experiment: /tmp/drcaps-exp-y/q.yaml", end="")
        out.close_lines()
    assert [e[0] for e in events] == ["paths", "text", "text"]
    shower = relay.Shower({"out": "/home/me", "experiment": "/home/me/exps"})
    for event in events:
        shower(event)
    assert capsys.readouterr().out == ("exported best config: /home/me/q.best.yaml (run http://127.0.0.1:5000/#/x)\n"
                                       "experiment: /home/me/exps/q.yaml")
    assert out.getvalue().startswith("exported best config: /tmp/drcaps-out-x")   # kept as written, too


def test_a_sink_that_fails_never_stops_the_search() -> None:
    def broken(event: relay.Event) -> None:
        raise ConnectionError("the client went away")

    with relay.sending(broken):
        relay.send("text", "out", "x\n")
        view = live.make_view(*SETTINGS, verbose=1)
        with live.showing(view):
            view.started("a", 0, {})                          # type: ignore[union-attr]


def test_an_interrupted_search_leaves_its_running_trials_as_they_were(capsys: pytest.CaptureFixture[str]) -> None:
    shower = relay.Shower({})
    shower(("view", "open", (*SETTINGS, False)))
    shower(("view", "started", ("a", 0, {"train.lr": 0.01})))
    shower(("view", "close", (True,)))
    assert "stopped" not in capsys.readouterr().out
    shower(("view", "open", (*SETTINGS, False)))
    shower(("view", "started", ("a", 0, {"train.lr": 0.01})))
    shower.close(interrupted=False)                           # the search ended (time budget): what ran is stopped
    assert "trial 0 stopped at epoch 0" in capsys.readouterr().out
