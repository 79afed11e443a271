"""Every check that can be made before work starts, table-driven through ``drcaps`` itself (``cli.main``) in an
empty working folder: exit code 2, ONE ``error: ...`` line naming the field or flag, and nothing written there
(no mlflow.db, no optuna.db, no drcaps-runs, no export). Nothing here starts Ray or trains."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.cli import main
from tests.conftest import TINY_EXPERIMENT, closed_port


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    """A real HTTP/1 server on 127.0.0.1: something that accepts connections but is not Ray."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:   # not on the test's stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model after 1 epoch on 100 digits (adam, lr 0.001), saved as ``drcaps train --save-model`` does."""
    from drcapsnet.checkpoint import LAST
    from drcapsnet.config import DataConfig, TrainConfig, model_preset
    from drcapsnet.train import train

    folder = tmp_path_factory.mktemp("ckpt")
    train(model_preset("tiny"), DataConfig(limit_train=100, batch_size=50),
          TrainConfig(epochs=1, device="cpu", num_threads=1), report=lambda m: None, checkpoint_dir=folder)
    return str(folder / LAST)


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.fixture()
def files(tmp_path: Path, store: str, http_port: int, checkpoint: str) -> dict[str, str]:
    """Inputs outside the working folder: a good experiment, a bad YAML, an empty file, a plain file, a folder."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "exp.yaml").write_text(TINY_EXPERIMENT)
    (d / "bad.yaml").write_text("name: [unclosed\n")
    (d / "empty.yaml").write_text("")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (d / "afile").write_text("not a folder")
    (d / "folder").mkdir()
    (d / "bomb.yaml").write_text(BOMB)
    (d / "dup.yaml").write_text(TINY_EXPERIMENT.replace("train: {epochs: 2,", "train: {epochs: 2, epochs: 3,"))
    return {"exp": str(d / "exp.yaml"), "bad": str(d / "bad.yaml"), "empty": str(d / "empty.yaml"),
            "binary": str(d / "binary.yaml"), "file": str(d / "afile"), "dir": str(d / "folder"),
            "port": str(closed_port()), "http": str(http_port), "store": store, "ckpt": checkpoint,
            "bomb": str(d / "bomb.yaml"), "dup": str(d / "dup.yaml"), "long": "n" * 200}


# (case id, argv with {placeholders} from `files`, substrings the error line must hold)
CASES: list[tuple[str, list[str], list[str]]] = [
    ("missing-file", ["search", "{dir}/nope.yaml"], ["nope.yaml", "cannot read"]),
    ("directory-not-file", ["search", "{dir}"], ["folder", "cannot read"]),
    ("empty-file", ["search", "{empty}"], ["empty file"]),
    ("bad-yaml", ["search", "{bad}"], ["YAML syntax error"]),
    ("binary-file", ["search", "{binary}"], ["cannot read"]),
    ("set-without-equals", ["search", "{exp}", "--set", "trainlr"], ["--set", "KEY=VALUE"]),
    ("set-empty-key", ["search", "{exp}", "--set", "=3"], ["KEY=VALUE"]),
    ("set-unknown-field", ["search", "{exp}", "--set", "train.lrr=1"], ["train.lrr", "did you mean 'lr'"]),
    ("zero-samples", ["search", "{exp}", "--set", "search.num_samples=0"], ["search.num_samples", "got 0"]),
    ("negative-epochs", ["search", "{exp}", "--set", "train.epochs=-1"], ["train.epochs", "got -1"]),
    ("huge-units", ["search", "{exp}", "--set", "model.units=100000"], ["model.units", "at most"]),
    ("infinite-weight", ["search", "{exp}", "--set", "model.reconstruction_weight=.inf"],
     ["model.reconstruction_weight", "finite"]),
    ("storage-path-is-a-file", ["search", "{exp}", "--storage-path", "{file}"], ["--storage-path", "afile"]),
    ("storage-path-under-a-file", ["search", "{exp}", "--storage-path", "{file}/sub"], ["--storage-path"]),
    ("optuna-storage-under-a-file", ["search", "{exp}", "--set", "search.storage=sqlite:///{file}/optuna.db"],
     ["search.storage"]),
    ("optuna-storage-unknown-scheme", ["search", "{exp}", "--set", "search.storage=redis://x"], ["search.storage"]),
    ("tracking-folder-is-a-file", ["search", "{exp}", "--tracking-uri", "sqlite:///{file}/mlflow.db"],
     ["tracking.uri", "afile"]),
    ("tracking-db-is-a-folder", ["search", "{exp}", "--tracking-uri", "sqlite:///{dir}"], ["tracking.uri"]),
    ("tracking-unknown-scheme", ["search", "{exp}", "--tracking-uri", "foo://host/x"], ["unknown scheme"]),
    ("tracking-file-store", ["search", "{exp}", "--tracking-uri", "file:///tmp/mlruns"], ["file store"]),
    ("tracking-unreachable-server", ["search", "{exp}", "--tracking-uri", "http://127.0.0.1:{port}"],
     ["cannot reach"]),
    ("test-acc-with-asha", ["search", "{exp}", "--set", "search.metric=test_acc"], ["search.metric", "test_acc"]),
    ("test-acc-without-scheduler", ["search", "{exp}", "--set", "search.metric=test_acc",
                                    "--set", "search.scheduler.name=none"], ["search.metric"]),
    ("val-acc-every-2-epochs", ["search", "{exp}", "--set", "train.eval_interval=2"], ["train.eval_interval"]),
    ("eval-interval-in-space", ["search", "{exp}", "--set",
                                "search.space.train.eval_interval={{type: int, low: 1, high: 2}}"],
     ["search.space.train.eval_interval"]),
    ("registered-model-with-slash", ["search", "{exp}", "--set", "tracking.registered_model=a/b"],
     ["tracking.registered_model", "a/b"]),
    ("out-is-a-folder", ["search", "{exp}", "--out", "{dir}"], ["--out"]),
    ("out-under-a-file", ["search", "{exp}", "--out", "{file}/best.yaml"], ["--out"]),
    ("image-size-in-space", ["search", "{exp}", "--set",
                             "search.space.model.image_size={{type: categorical, choices: [28, 32]}}"],
     ["search.space.model.image_size", "28"]),
    ("space-fields-clash-together", ["search", "{exp}",
                                     "--set", "search.space.model.conv_kernel={{type: int, low: 5, high: 24}}",
                                     "--set", "search.space.model.primary_kernel={{type: int, low: 5, high: 9}}"],
     ["search.space", "combination", "model.conv_kernel=24"]),
    ("image-size-not-the-data", ["search", "{exp}", "--set", "model.image_size=32"], ["model.image_size", "28"]),
    ("dataset-absent-no-download", ["search", "{exp}", "--set", "data.dataset=mnist", "--set", "data.data_dir={dir}",
                                    "--set", "data.download=false"], ["data.dataset", "mnist"]),
    ("idx-folder-missing", ["search", "{exp}", "--set", "data.dataset=idx", "--set", "data.data_dir={dir}/nope"],
     ["data.data_dir"]),
    ("more-cpus-than-the-machine", ["search", "{exp}", "--set", "search.resources.cpu=4096"],
     ["search.resources.cpu", "4096"]),
    ("more-gpus-than-the-machine", ["search", "{exp}", "--set", "search.resources.gpu=64"],
     ["search.resources.gpu"]),
    ("address-syntax", ["search", "{exp}", "--address", "nowhere"], ["--address", "HOST:PORT"]),
    ("address-unreachable", ["search", "{exp}", "--address", "127.0.0.1:{port}"], ["--address", "cannot reach"]),
    ("ray-client-unreachable", ["search", "{exp}", "--address", "ray://127.0.0.1:{port}"], ["--address"]),
    ("address-not-ray", ["search", "{exp}", "--address", "127.0.0.1:{http}"], ["not a Ray cluster", "6379"]),
    ("ray-client-not-ray", ["search", "{exp}", "--address", "ray://127.0.0.1:{http}"], ["not a Ray cluster", "10001"]),
    ("resume-nothing", ["search", "{exp}", "--resume"], ["--resume"]),
    ("validate-bad-samples", ["validate", "{exp}", "--show-samples", "-1"], ["--show-samples"]),
    ("train-save-model-is-a-folder", ["train", "--save-model", "{dir}", "--epochs", "1"], ["--save-model"]),
    ("train-checkpoint-dir-is-a-file", ["train", "--checkpoint-dir", "{file}", "--epochs", "1"],
     ["--checkpoint-dir"]),
    ("train-load-model-is-garbage", ["train", "--load-model", "{exp}"], ["checkpoint", "exp.yaml"]),
    ("train-zero-batch", ["train", "--batch-size", "0"], ["data.batch_size"]),
    ("train-nan-lr", ["train", "--set", "train.lr=.nan"], ["train.lr"]),
    ("evaluate-without-store", ["evaluate", "--model-uri", "models:/x@best"], ["mlflow.db"]),
    ("evaluate-garbage-model-uri", ["evaluate", "--model-uri", "garbage", "--tracking-uri", "{store}"],
     ["--model-uri", "garbage"]),
    ("evaluate-unknown-run", ["evaluate", "--model-uri", "runs:/nope/model", "--tracking-uri", "{store}"],
     ["--model-uri", "nope"]),
    ("evaluate-unknown-version", ["evaluate", "--model-uri", "models:/x/7", "--tracking-uri", "{store}"],
     ["--model-uri"]),
    ("export-best-no-search", ["export-best", "--experiment", "x", "--tracking-uri", "{store}", "--out",
                               "{dir}/b.yaml"], ["'x'"]),
    ("search-empty-tracking-uri", ["search", "{exp}", "--tracking-uri", ""], ["--tracking-uri", "empty"]),
    ("search-empty-address", ["search", "{exp}", "--address", " "], ["--address", "empty"]),
    ("evaluate-zero-batch", ["evaluate", "--checkpoint", "{exp}", "--batch-size", "0"], ["--batch-size"]),
    ("export-best-without-store", ["export-best", "--experiment", "x", "--out", "{dir}/b.yaml"], ["mlflow.db"]),
    ("export-best-unknown-scheme", ["export-best", "--experiment", "x", "--tracking-uri", "foo://x",
                                    "--out", "{dir}/b.yaml"], ["unknown scheme"]),
    ("ui-without-store", ["ui"], ["mlflow.db"]),
    ("ui-bad-port", ["ui", "--port", "0"], ["--port"]),
    # issue 21: configs that lie quietly, hostile files, names too long, flags that contradict a checkpoint
    ("duplicate-key", ["search", "{dup}"], ["train.epochs: given twice", "line 4", "keep one"]),
    ("validate-duplicate-key", ["validate", "{dup}"], ["dup.yaml", "train.epochs: given twice"]),
    ("validate-billion-laughs", ["validate", "{bomb}"], ["bomb.yaml", "aliases expand to more than"]),
    ("asha-grace-at-epochs", ["search", "{exp}", "--set", "search.scheduler.grace_period=2"],
     ["search.scheduler.grace_period: 2 is not below train.epochs (2)", "asha would never stop a trial"]),
    ("median-grace-above-epochs", ["search", "{exp}", "--set", "search.scheduler.name=median",
                                   "--set", "search.scheduler.grace_period=3"], ["median would never stop"]),
    ("name-too-long", ["search", "{exp}", "--set", "name={long}"], ["name: 'nnnn", "200 bytes long, at most 128"]),
    ("tracking-experiment-too-long", ["search", "{exp}", "--set", "tracking.experiment={long}"],
     ["tracking.experiment", "at most 128"]),
    ("registered-model-too-long", ["validate", "{exp}", "--set", "tracking.registered_model={long}"],
     ["tracking.registered_model", "at most 128"]),
    ("train-preset-contradicts-checkpoint", ["train", "--preset", "small", "--load-model", "{ckpt}", "--epochs", "2"],
     ["--preset small", "model.conv_channels=64 (checkpoint: 16)", "without --load-model"]),
    ("train-units-contradict-checkpoint", ["train", "--units", "16", "--load-model", "{ckpt}", "--epochs", "2"],
     ["model.units=16 (checkpoint: 8)"]),
    ("train-dataset-contradicts-checkpoint", ["train", "--dataset", "mnist", "--load-model", "{ckpt}",
                                              "--epochs", "2"], ["data.dataset: 'mnist'", "holds 'digits'"]),
    ("train-limit-contradicts-checkpoint", ["train", "--set", "data.limit_train=50", "--load-model", "{ckpt}",
                                            "--epochs", "2"], ["data.limit_train: 50", "holds 100"]),
    ("train-lr-contradicts-checkpoint", ["train", "--lr", "0.5", "--load-model", "{ckpt}", "--epochs", "2"],
     ["train.lr: 0.5", "holds 0.001 (its optimizer state)", "set it to 0.001"]),
    ("train-optimizer-contradicts-checkpoint", ["train", "--optimizer", "sgd", "--load-model", "{ckpt}",
                                                "--epochs", "2"], ["train.optimizer: 'sgd'", "'adam'"]),
]


@pytest.mark.parametrize(("argv", "expected"), [(a, e) for _, a, e in CASES], ids=[c for c, _, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv: list[str], expected: list[str],
                                                           files: dict[str, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail(f"a command exec'd {a}"))
    started = time.monotonic()
    try:
        code = main([arg.format(**files) for arg in argv])
    except SystemExit as e:               # argparse
        code = e.code
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text.format(**files) in err, (text, err)
    assert sorted(p.name for p in cwd.iterdir()) == [], "the working folder must hold nothing new"
    assert list(Path(files["dir"]).iterdir()) == []
    assert not ray.is_initialized()
    assert elapsed < 20, f"{elapsed:.1f} s"


def test_sigterm_is_an_interrupt_not_a_kill(tmp_path: Path) -> None:
    """``drcaps`` maps SIGTERM to KeyboardInterrupt (exit 130), so a stopped search saves its state."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys, time\n"
            "from search import cli\n"
            "def slow(*args, **kwargs):\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); return 0\n"
            "cli.commands.validate_command = slow\n"
            "sys.exit(cli.main(['validate', 'x.yaml']))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "interrupted" in done.stderr, (done.returncode, done.stderr)
    assert time.monotonic() - started < 25
    assert signal.SIGTERM  # the handler is restored after main() returns (checked in-process below)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
