"""drcapsnet/cost.py: parameter and FLOP counts, and a latency that comes from timed forward passes.

Which configuration is faster is a timing claim: benchmarks/latency.py, not here."""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

from drcapsnet.config import model_preset
from drcapsnet.cost import device_name, flops, latency_ms, model_cost, params
from drcapsnet.model import CapsNet
from drcapsnet.precision import resolve_precision

TINY = model_preset("tiny")
SHAPE = (TINY.in_channels, TINY.image_size, TINY.image_size)


def test_params_and_flops_of_a_linear_layer_by_hand() -> None:
    layer = nn.Linear(10, 5, bias=False)
    assert params(layer) == 50
    assert flops(layer, (10,), batch=4) == 2 * 10 * 5           # a multiply-add is 2 FLOPs, per image


def test_paper_network_parameter_count() -> None:
    assert params(CapsNet(model_preset("paper"))) == 8_215_568


def test_flops_grow_with_routing_iterations_and_leave_the_mode_alone() -> None:
    counts = []
    for iterations in (1, 3, 5):
        model = CapsNet(model_preset("tiny", routing_iterations=iterations)).train()
        counts.append(flops(model, SHAPE, batch=2))
        assert model.training                                   # restored after the eval-mode pass
    assert counts[0] < counts[1] < counts[2]
    assert flops(CapsNet(TINY), SHAPE, batch=1) == pytest.approx(flops(CapsNet(TINY), SHAPE, batch=3))


def test_latency_comes_from_timed_forward_passes_after_warm_up() -> None:
    """A hook counts every forward call and its batch; it sleeps 1 s in each warm-up pass and 40 ms in each timed
    one, so the result can only be the timed passes' median over the batch (>= 20 ms, far below 500 ms)."""
    model = CapsNet(TINY)
    calls: list[int] = []
    warmup, repeats, batch = 2, 5, 2

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        calls.append(args[0].shape[0])
        time.sleep(1.0 if len(calls) <= warmup else 0.04)

    model.register_forward_pre_hook(hook)
    measured = latency_ms(model, SHAPE, batch=batch, repeats=repeats, warmup=warmup)
    assert calls == [batch] * (warmup + repeats)
    assert (measured.warmup, measured.repeats, measured.batch, measured.precision) == (warmup, repeats, batch, "fp32")
    assert len(measured.pass_ms) == repeats and all(t >= 40 for t in measured.pass_ms)
    assert 20 <= measured.latency_ms < 500 / batch
    assert measured.latency_ms == pytest.approx(sorted(measured.pass_ms)[repeats // 2] / batch)
    assert measured.device == device_name(torch.device("cpu")) and measured.device.startswith("cpu: ")


def test_model_cost_is_one_flat_record() -> None:
    record = model_cost(TINY, batch=2, repeats=3, warmup=1)
    assert record["params"] == params(CapsNet(TINY)) and record["flops"] == flops(CapsNet(TINY), SHAPE)
    assert record["latency_ms"] > 0 and str(record["latency_device"]).startswith("cpu: ")
    assert (record["latency_repeats"], record["latency_warmup"], record["latency_batch"]) == (3, 1, 2)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats >= 1"):
        latency_ms(CapsNet(TINY), SHAPE, repeats=0)


def test_latency_runs_in_the_precision_given() -> None:
    """bf16 forced on this CPU (emulated where it is not native): every pass runs under autocast, and says so."""
    model = CapsNet(TINY)
    autocast: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: autocast.append(torch.is_autocast_enabled("cpu")))
    bf16 = resolve_precision(torch.device("cpu"), True, env={"DRCAPS_CPU_BF16": "1"})
    assert latency_ms(model, SHAPE, repeats=2, warmup=1, precision=bf16).precision == "bf16"
    assert autocast == [True] * 3
    assert latency_ms(model, SHAPE, repeats=2, warmup=1).precision == "fp32" and autocast[3:] == [False] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_on_cuda_names_the_gpu() -> None:
    model = CapsNet(TINY).to("cuda")
    measured = latency_ms(model, SHAPE, batch=4, repeats=3, warmup=1,
                          precision=resolve_precision(torch.device("cuda"), True))
    assert measured.device == torch.cuda.get_device_name() and measured.precision == "bf16"
    assert measured.latency_ms > 0
