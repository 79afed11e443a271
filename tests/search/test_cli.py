"""search.cli: ``drcaps`` in-process through ``main(argv)`` (exit code, stdout, stderr) and once as the real
console script. A user's mistake is exit code 2 and one ``error: ...`` line naming the bad value, before any work."""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from drcapsnet.checkpoint import load_checkpoint
from drcapsnet.errors import ConfigError
from search import commands, tracking
from search.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
TINY = ["--preset", "tiny", "--dataset", "digits", "--batch-size", "32", "--no-cuda", "--no-progress",
        "--optimizer", "adam", "--lr", "3.0e-3", "--units", "8", "--num-iterations", "2", "--seed", "1",
        "--set", "train.num_threads=1"]   # 2 shared cores: more threads only oversubscribe


def _epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ")]


def _user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    """Run ``drcaps argv`` expecting the user's-mistake exit: code 2 and ONE ``error:`` line. Returns (out, err)."""
    try:
        code = main(argv)
    except SystemExit as e:                      # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert err.startswith("error:") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    return out, err


@dataclass(frozen=True)
class Trained:
    model: Path
    code: int
    out: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One epoch of the tiny model on digits through ``drcaps train``, saved with --save-model."""
    model = tmp_path_factory.mktemp("train") / "m.pt"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *TINY, "--epochs", "1", "--save-model", str(model)])
    return Trained(model, code, out.getvalue())


# ---------------------------------------------------------------------------------------------------- train

def test_train_prints_an_epoch_summary_and_saves_the_checkpoint(trained: Trained) -> None:
    assert trained.code == 0, trained.out
    lines = _epoch_lines(trained.out)
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1") and "val_acc" in lines[0], trained.out
    state = load_checkpoint(trained.model)
    config = state["config"]
    assert state["epoch"] == 1
    assert (config["model"]["units"], config["model"]["routing_iterations"]) == (8, 2)
    assert (config["train"]["seed"], config["train"]["optimizer"], config["train"]["lr"]) == (1, "adam", 3.0e-3)
    assert (config["data"]["dataset"], config["train"]["device"]) == ("digits", "cpu")


def test_train_resumes_from_a_saved_model_with_the_same_flags(trained: Trained, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "m2.pt"
    assert main(["train", *TINY, "--load-model", str(trained.model), "--epochs", "2",
                 "--save-model", str(out_path)]) == 0
    lines = _epoch_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith("epoch 2/2"), lines
    assert load_checkpoint(out_path)["epoch"] == 2


def test_train_resumes_a_saved_model_without_repeating_its_flags(trained: Trained,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # `drcaps train --load-model m.pt --epochs 2`: the architecture (tiny, units 8) comes from the checkpoint
    code = main(["train", "--load-model", str(trained.model), "--epochs", "2", "--no-cuda", "--no-progress",
                 "--set", "train.num_threads=1"])
    lines = _epoch_lines(capsys.readouterr().out)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("epoch 2/2"), lines


def test_resuming_with_a_flag_that_changes_the_model_is_a_user_error(trained: Trained,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out, err = _user_error(capsys, ["train", *TINY, "--units", "4", "--load-model", str(trained.model),
                                    "--epochs", "2"])
    assert "model.units" in err and str(trained.model) in err and _epoch_lines(out) == []


def test_resuming_a_finished_checkpoint_is_a_user_error(trained: Trained, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # m.pt already holds epoch 1 of 1: nothing to train, so say so instead of silently doing nothing
    out, err = _user_error(capsys, ["train", *TINY, "--load-model", str(trained.model), "--epochs", "1",
                                    "--save-model", str(tmp_path / "m3.pt")])
    assert "epochs" in err and _epoch_lines(out) == []


def test_train_from_a_config_file_with_set_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: {preset: tiny}\n"
                      "data: {dataset: digits, batch_size: 32, limit_train: 100}\n"
                      "train: {epochs: 3, optimizer: adam, lr: 3.0e-3, device: cpu}\n")
    assert main(["train", "--config", str(config), "--set", "train.epochs=1", "--set", "model.units=4",
                 "--set", "train.num_threads=1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "units 4 on digits: 100 train" in out, out           # the file's limit_train, the override's units
    assert [line[:9] for line in _epoch_lines(out)] == ["epoch 1/1"]


@pytest.mark.parametrize(("argv", "names"), [
    (["--epochs", "x"], ["--epochs", "'x'"]),
    (["--routing", "foo"], ["--routing", "'foo'"]),
    (["--bogus"], ["--bogus"]),
], ids=["epochs-x", "routing-foo", "unknown-flag"])
def test_bad_flag_types_exit_2_with_one_line(argv: list[str], names: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert all(name in err for name in names), err


@pytest.mark.parametrize(("argv", "names"), [
    (["--epochs", "0"], ["train.epochs", "got 0"]),
    (["--units", "-1"], ["model.units", "got -1"]),
    (["--set", "train.lrr=1"], ["train.lrr", "did you mean 'lr'"]),
    (["--dataset", "nope"], ["data.dataset", "'nope'"]),
], ids=["epochs-0", "units-negative", "set-typo", "dataset-nope"])
def test_bad_values_exit_2_with_one_line_naming_them(argv: list[str], names: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out, err = _user_error(capsys, ["train", *argv])
    assert all(name in err for name in names), err
    assert _epoch_lines(out) == []


def test_missing_idx_folder_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    _, err = _user_error(capsys, ["train", "--dataset", "idx", "--data-dir", "/nonexistent/x"])
    assert "/nonexistent/x" in err and "--data-dir" in err


def test_torchvision_dataset_absent_without_download_points_at_data_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, err = _user_error(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path),
                                  "--set", "data.download=false"])
    assert "--data-dir" in err and str(tmp_path) in err


def test_missing_checkpoint_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = _user_error(capsys, ["train", *TINY, "--epochs", "1", "--load-model", "/nonexistent.pt"])
    assert "/nonexistent.pt" in err
    assert "epoch" not in out


# ---------------------------------------------------------------------------------------------------- evaluate

def test_evaluate_a_checkpoint_reproduces_its_test_accuracy(trained: Trained,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(trained.model), "--batch-size", "32", "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "on the digits test split" in out, out
    correct, total = map(int, out.rsplit("(", 1)[1].rstrip(")\n").split("/"))
    assert correct / total == load_checkpoint(trained.model)["metrics"]["test_acc"]


def test_evaluate_a_registered_model_scores_as_its_checkpoint(trained: Trained, store: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A model loaded from MLflow is a CapsNetClassifier: it is evaluated through its ``.capsnet``, like a file."""
    from drcapsnet.checkpoint import load_model
    from drcapsnet.model import CapsNetClassifier

    assert main(["evaluate", "--checkpoint", str(trained.model), "--batch-size", "32", "--no-cuda"]) == 0
    by_file = capsys.readouterr().out
    monkeypatch.setattr(tracking, "load_model",
                        lambda uri, model_uri: CapsNetClassifier(load_model(trained.model)[0]).eval())
    assert main(["evaluate", "--model-uri", "models:/m@best", "--tracking-uri", store, "--batch-size", "32",
                 "--no-cuda"]) == 0
    by_uri = capsys.readouterr().out
    assert by_uri.startswith("models:/m@best: accuracy ") and by_uri.split(": ", 1)[1] == by_file.split(": ", 1)[1]


def test_commands_are_typed_functions(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    """The library call behind each command line: no argparse Namespace."""
    assert commands.validate_command(QUICKSTART, ["search.num_samples=3"], show_samples=1) == 0
    out = capsys.readouterr().out
    assert "3 trials" in out and "proposal 0:" in out
    assert commands.evaluate_command(checkpoint=trained.model, batch_size=64, cuda=False, split="val") == 0
    assert "on the digits val split" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds 1 epochs"):
        commands.train_command(None, ["train.epochs=1"], load_model=trained.model, progress=False)


def test_evaluate_an_unknown_registered_model(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    _, err = _user_error(capsys, ["evaluate", "--model-uri", "models:/nope@best", "--tracking-uri", store])
    assert "models:/nope@best" in err and store in err


def test_export_best_of_an_unknown_experiment(store: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "b.yaml"
    _, err = _user_error(capsys, ["export-best", "--experiment", "nope", "--tracking-uri", store,
                                  "--out", str(out_file)])
    assert "'nope'" in err
    assert not out_file.exists()


# ---------------------------------------------------------------------------------------------------- validate

def test_validate_the_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {QUICKSTART}") and "quickstart" in out


def test_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(QUICKSTART.read_text().replace("epochs: 6", "epochs: 0").replace("sampler: tpe", "sampler: tpee"))
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "train.epochs: must be an integer >= 1, got 0" in err, err
    assert "search.sampler" in err and "'tpee'" in err, err


def test_show_samples_is_seeded_in_process_and_as_the_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["validate", str(QUICKSTART), "--show-samples", "3"]
    assert main(argv) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if "proposal" in line]
    assert [line.split(":")[0].strip() for line in first] == ["proposal 0", "proposal 1", "proposal 2"]
    assert all("train.lr=" in line and "model.units=" in line for line in first)

    assert main(argv) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "proposal" in line] == first

    script = Path(sys.executable).parent / "drcaps"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "search.cli"]
    done = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if "proposal" in line] == first


# ---------------------------------------------------------------------------------------------------- search, ui

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_against_an_unreachable_server_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    _, err = _user_error(capsys, ["search", str(QUICKSTART), "--tracking-uri", uri])
    assert time.monotonic() - started < 10
    assert uri in err
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []               # no mlflow.db, no drcaps-runs


def test_search_with_zero_samples(capsys: pytest.CaptureFixture[str]) -> None:
    _, err = _user_error(capsys, ["search", str(QUICKSTART), "--set", "search.num_samples=0"])
    assert "search.num_samples" in err and "got 0" in err


def test_ui_without_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    def no_exec(*args: object) -> None:          # a guard: a regression would replace pytest with `mlflow ui`
        raise AssertionError(f"drcaps ui started {args}")

    monkeypatch.setattr("os.execv", no_exec)
    db = tmp_path / "none.db"
    _, err = _user_error(capsys, ["ui", "--tracking-uri", f"sqlite:///{db}"])
    assert str(db) in err and "--tracking-uri" in err
    assert not db.exists()


def test_ray_client_ships_plain_data_and_writes_what_the_head_returns(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--address ray://...``: the head gets picklable plain data (search_on_head and its arguments); its files are
    written beside --out here and the paths it printed are shown as they are here."""
    from search.commands.cluster import search_on_head

    shipped: list[tuple[object, ...]] = []

    def on_head(address: str, fn: object, *args: object, on_event: Callable[[tuple], None]) -> dict[str, object]:
        shipped.append((address, fn, *pickle.loads(pickle.dumps(args))))
        on_event(("paths", {"out": "/head/out", "experiment": "/head/exp"}))    # as the head sends its output
        on_event(("text", "out", "exported best config: /head/out/b.yaml\n"))
        return {"error": None, "code": 0, "files": {"b.yaml": b"name: b\n"}}

    monkeypatch.setattr("search.tune.run_on_head", on_head)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as listener:                       # something answers at the address
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"ray://127.0.0.1:{listener.getsockname()[1]}"
        code = main(["search", str(QUICKSTART), "--address", address, "--out", str(tmp_path / "b.yaml"),
                     "--smoke-test", "--set", "search.num_samples=3"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "b.yaml").read_bytes() == b"name: b\n"
    assert f"exported best config: {tmp_path}/b.yaml" in out, out
    [(where, fn, experiment, overrides, options, text)] = shipped
    assert (where, fn, experiment, overrides) == (address, search_on_head, QUICKSTART, ["search.num_samples=3"])
    assert options == {"tracking_uri": None, "storage_path": None, "out": tmp_path / "b.yaml", "resume": False,
                       "smoke_test": True, "verbose": 0}
    assert text == QUICKSTART.read_text()


def test_search_on_head_returns_a_user_error_as_data() -> None:
    """On the head, a DrcapsError comes back as data (raised again on the client), not as a failed task."""
    from search.commands.cluster import search_on_head

    outcome = search_on_head(QUICKSTART, ["search.num_samples=0"], {"out": None, "smoke_test": False},
                             QUICKSTART.read_text())
    assert set(outcome) == {"error"} and isinstance(outcome["error"], ConfigError)
    assert "search.num_samples" in str(pickle.loads(pickle.dumps(outcome["error"])))


# ---------------------------------------------------------------------------------------------------- help

def _help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and not err, err
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_is_for_users_with_an_example_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, ["--help"])
    for developer_word in ("_call", "RUN_FLAGS", "EXIT_CODES", "Namespace", "DrcapsError"):
        assert developer_word not in text, developer_word
    commands_ = _subparsers(build_parser())
    assert set(commands_) == {"train", "evaluate", "validate", "search", "follow", "export-best", "report", "ui"}
    for name in commands_:
        assert name in text
        sub = _help(capsys, [name, "--help"])
        examples = sub.partition("examples:")[2]
        assert f"  drcaps {name} " in examples, f"{name}: no example in its --help"


def test_every_argument_and_flag_is_explained() -> None:
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            label = "/".join(action.option_strings) or action.dest
            words = (action.help or "").split()                  # a bare dotted name ("train.lr") explains nothing
            assert len(words) >= 2, f"drcaps {name} {label}: no help"


def test_search_help_explains_the_experiment_and_set(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(capsys, ["search", "--help"]).split())          # argparse's wrapping undone
    assert "experiment the experiment file (YAML)" in text
    assert "--set KEY=VALUE change one field of the experiment file by its dotted name" in text
    assert "--set search.num_samples=40" in text


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    assert _help(capsys, ["--version"]).strip() == f"drcaps {importlib.metadata.version('drcaps')}"
