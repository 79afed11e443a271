"""What a model costs to run: parameters, forward FLOPs per image, and MEASURED latency per image.

Pure PyTorch (no Ray, Optuna or MLflow), so a trial, a benchmark and a test measure the same way:

- ``params``: the parameter count (every parameter, decoder included).
- ``flops``: forward FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass in
  eval mode (a multiply-add is 2 FLOPs; it counts matrix products and convolutions, the ops with a FLOP formula in
  torch, not element-wise work such as squash or softmax), divided by the batch.
- ``latency_ms``: measured, never estimated (nn-Meter, MobiSys'21: FLOPs do not track latency). ``warmup`` forward
  passes of a batch of ``batch`` random images on the model's own device are run and thrown away, then ``repeats``
  passes are timed one by one (``torch.cuda.synchronize`` before and after each on CUDA, so the time is the GPU's,
  not the launch's); the result is the MEDIAN pass time divided by ``batch``, with the device's name, the repeat
  count, the warm-up count, the batch size and the precision, because a latency means nothing without them. The
  precision is a ``drcapsnet.precision.Precision`` (fp32 unless given): pass the one the trial evaluates with
  (``resolve_precision(device, train.bf16)``: bf16 autocast on CUDA and on CPUs with native bf16) to time what it runs.

The model is measured as it is called (a ``CapsNet`` in eval mode runs its decoder too, masked by the longest
capsule; that is what a registered ``CapsNetClassifier`` runs), under ``torch.inference_mode``; its train/eval mode
is restored afterwards.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from drcapsnet.config import ModelConfig
from drcapsnet.model import CapsNet, count_parameters
from drcapsnet.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Latency:
    """A measured latency and how it was measured."""

    latency_ms: float                 # median timed pass / batch: milliseconds per image
    device: str                       # "NVIDIA H100 80GB HBM3", "cpu: Intel(R) Xeon(R) ... (2 threads)"
    repeats: int                      # timed passes
    warmup: int                       # passes run first and not timed
    batch: int                        # images per pass
    precision: str                    # "fp32" or "bf16" (autocast: drcapsnet.precision)
    pass_ms: tuple[float, ...]        # every timed pass, whole batch, in order


def params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return count_parameters(model)


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def _inference(model: nn.Module, precision: Precision) -> Iterator[None]:
    """Eval mode, no autograd, the precision's autocast; the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision.autocast():
            yield
    finally:
        model.train(was_training)


def flops(model: nn.Module, image_shape: tuple[int, ...], batch: int = 1) -> float:
    """Forward FLOPs per image of ``model`` on a batch of ``batch`` random images of ``image_shape`` (C, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = _device(model)
    x = torch.rand(batch, *image_shape, device=device)                       # (B, C, H, W)
    counter = FlopCounterMode(display=False)
    with _inference(model, resolve_precision(device, bf16=False)), counter:
        model(x)
    return counter.get_total_flops() / batch


def _timed_pass(model: nn.Module, x: Tensor, device: torch.device) -> float:
    """One forward pass of ``x``, in milliseconds (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000.0


def latency_ms(model: nn.Module, image_shape: tuple[int, ...], *, batch: int = 1, repeats: int = 20,
               warmup: int = 5, precision: Precision | None = None) -> Latency:
    """Measured inference latency per image of ``model`` on its own device (see the module docstring)."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}")
    device = _device(model)
    precision = precision or resolve_precision(device, bf16=False)
    x = precision.images(torch.rand(batch, *image_shape, device=device))     # (B, C, H, W)
    with _inference(model, precision):
        for _ in range(warmup):
            model(x)
        times = tuple(_timed_pass(model, x, device) for _ in range(repeats))
    return Latency(latency_ms=statistics.median(times) / batch, device=device_name(device), repeats=repeats,
                   warmup=warmup, batch=batch, precision=precision.name, pass_ms=times)


def model_cost(cfg: ModelConfig, device: torch.device | str = "cpu", *, batch: int = 1, repeats: int = 20,
               warmup: int = 5, bf16: bool = False, model: nn.Module | None = None) -> dict[str, float | int | str]:
    """``params``, ``flops`` and ``latency_ms`` of a ``CapsNet`` of ``cfg`` (or of ``model``, already on its device)
    as one flat record, with ``latency_device``, ``latency_repeats``, ``latency_warmup``, ``latency_batch`` and
    ``latency_precision`` beside them: what a trial reports once and logs. ``bf16``: as ``train.bf16``."""
    precision = resolve_precision(torch.device(device), bf16)
    if model is None:
        model = CapsNet(cfg).to(device)
        if precision.channels_last:                                          # as train() sets it up
            model = model.to(memory_format=torch.channels_last)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    measured = latency_ms(model, shape, batch=batch, repeats=repeats, warmup=warmup, precision=precision)
    record = {f"latency_{k}": v for k, v in asdict(measured).items() if k not in ("latency_ms", "pass_ms")}
    return {"params": params(model), "flops": flops(model, shape), "latency_ms": measured.latency_ms, **record}
