"""drcapsnet.precision: which CPUs get bf16, the fallback to fp32 (logged once, with the reason), and bf16 training
on the CPU: it learns, it is deterministic for a thread count, and a CPU without bf16 trains in fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from drcapsnet import precision as prec
from drcapsnet.checkpoint import LAST, load_checkpoint
from drcapsnet.config import DataConfig, TrainConfig, model_preset
from drcapsnet.data import Datasets, load_datasets
from drcapsnet.errors import ConfigError
from drcapsnet.precision import cpu_bf16, cpu_flags, resolve_precision
from drcapsnet.train import train

CPU = torch.device("cpu")
SAPPHIRE = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
EPYC_ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
DATA = DataConfig(dataset="digits", limit_train=400, batch_size=32)


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "_logged", set())            # "once per process": each test starts a new process's worth
    monkeypatch.delenv(prec.ENV, raising=False)


@pytest.fixture(scope="module")
def digits() -> Datasets:
    return load_datasets(DATA)


def test_flags_are_read_from_cpuinfo_and_a_cpu_without_bf16_flags_gets_none() -> None:
    assert {"amx_bf16", "avx512_bf16"} <= cpu_flags(SAPPHIRE)
    assert cpu_flags("") == set() and "avx2" in cpu_flags(EPYC_ZEN3)
    ok, why = cpu_bf16(EPYC_ZEN3, env={})
    assert not ok and "amx_bf16 or avx512_bf16" in why
    assert cpu_bf16("", env={})[0] is False                # no /proc/cpuinfo (not Linux): no claim of bf16


def test_the_environment_overrides_the_detection_both_ways_and_a_bad_value_is_one_error() -> None:
    assert cpu_bf16(SAPPHIRE, env={prec.ENV: "0"}) == (False, f"{prec.ENV}=0")
    assert cpu_bf16(EPYC_ZEN3, env={prec.ENV: "1"}) == (True, f"{prec.ENV}=1")
    with pytest.raises(ConfigError, match=rf"{prec.ENV}: must be 0 or 1, got 'yes'; unset it"):
        cpu_bf16(SAPPHIRE, env={prec.ENV: "yes"})


def test_resolution_per_device_and_setting() -> None:
    off = resolve_precision(CPU, False, cpuinfo=SAPPHIRE, env={})
    assert (off.name, off.channels_last) == ("fp32", False)
    cuda = resolve_precision(torch.device("cuda"), True)            # CUDA keeps its autocast, NCHW
    assert (cuda.name, cuda.channels_last, cuda.device_type) == ("bf16", False, "cuda")
    forced = resolve_precision(CPU, True, cpuinfo=EPYC_ZEN3, env={prec.ENV: "1"})
    assert (forced.name, forced.channels_last, forced.dtype) == ("bf16", True, torch.bfloat16)
    x = torch.rand(2, 1, 28, 28)
    assert forced.images(x).is_contiguous(memory_format=torch.channels_last) and torch.equal(forced.images(x), x)


@pytest.mark.skipif(not cpu_bf16(env={})[0], reason="this CPU has no native bf16")
def test_this_cpu_with_native_bf16_gets_it_by_default() -> None:
    p = resolve_precision(CPU, True)
    assert p.name == "bf16" and ("amx_bf16" in p.reason or "avx512_bf16" in p.reason)


def test_the_fallback_is_logged_once_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="drcapsnet.precision"):
        for _ in range(3):
            p = resolve_precision(CPU, True, cpuinfo=EPYC_ZEN3, env={})
    assert p.name == "fp32" and not p.channels_last
    assert [r.getMessage() for r in caplog.records] == [f"train.bf16: fp32 on cpu instead of bf16: {p.reason}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drcapsnet.precision"):
        resolve_precision(CPU, False, cpuinfo=EPYC_ZEN3, env={})     # asked for fp32: nothing to report
    assert caplog.records == []


def _losses(digits: Datasets, tmp: object = None, **changes: object) -> list[dict[str, float]]:
    cfg = TrainConfig(**{"epochs": 3, "optimizer": "sgd", "lr": 0.3, "momentum": 0.9, "lr_decay": 1.0,
                         "device": "cpu", "num_threads": 1, "seed": 0, **changes})
    history: list[dict[str, float]] = []
    train(model_preset("tiny"), DATA, cfg, history.append, datasets=digits, checkpoint_dir=tmp)
    return history


def test_bf16_on_the_cpu_learns_and_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: object,
                                                     digits: Datasets) -> None:
    """bf16 autocast (forced where the CPU has no native bf16: emulated, same arithmetic): the loss falls every
    epoch, validation accuracy beats chance (10 classes) by far, and a second run with the same seed and one
    thread repeats every per-epoch figure exactly."""
    monkeypatch.setenv(prec.ENV, "1")
    first = _losses(digits, tmp_path)
    second = _losses(digits, epochs=2)                  # no lr decay: its epochs 1-2 are the first run's
    losses = [m["train_loss"] for m in first]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert first[-1]["val_acc"] > 0.5, first[-1]
    figures = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[m[k] for k in figures] for m in first[:2]] == [[m[k] for k in figures] for m in second]
    assert load_checkpoint(tmp_path / LAST)["precision"] == "bf16"             # type: ignore[operator]


def test_a_cpu_without_bf16_trains_in_fp32_and_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: object,
                                                        digits: Datasets, caplog: pytest.LogCaptureFixture) -> None:
    """The lack simulated with DRCAPS_CPU_BF16=0: train.bf16=true then trains exactly what train.bf16=false
    trains (fp32), the checkpoint says fp32, and the log says why, once."""
    monkeypatch.setenv(prec.ENV, "0")
    with caplog.at_level(logging.WARNING, logger="drcapsnet.precision"):
        asked = _losses(digits, tmp_path, epochs=1, bf16=True)
    plain = _losses(digits, epochs=1, bf16=False)
    untimed = [{k: v for k, v in m.items() if k not in ("images_per_s", "epoch_s")} for m in (asked[0], plain[0])]
    assert untimed[0] == untimed[1]
    assert load_checkpoint(tmp_path / LAST)["precision"] == "fp32"             # type: ignore[operator]
    assert [r.getMessage() for r in caplog.records] == [f"train.bf16: fp32 on cpu instead of bf16: {prec.ENV}=0"]
