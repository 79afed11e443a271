"""The numeric precision of a training or evaluation pass: bf16 autocast where the device does bf16 natively, else fp32.

``train.bf16`` (default true) asks for bf16 autocast. On CUDA it is granted as before. On a CPU it is granted only
where the CPU has native bf16 arithmetic (``amx_bf16`` or ``avx512_bf16`` among the /proc/cpuinfo flags: Intel
Sapphire Rapids and later, AMD Zen 4 and later) and PyTorch's oneDNN agrees
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``); elsewhere bf16 would be emulated, slower than fp32, so the pass
runs in fp32 and the reason is logged once per process. Either way the weights, their gradients, the optimiser
state and the loss stay fp32 (autocast casts a copy of each weight to bf16 for the matmuls and convolutions only),
and the routing (its softmax, agreement sums and squash) runs in fp32 on the CPU: see
``drcapsnet.model.DigitCaps``.

``DRCAPS_CPU_BF16=0`` turns CPU bf16 off (fp32, as on a CPU without it); ``DRCAPS_CPU_BF16=1`` turns it on whatever
the CPU (emulated where it is not native: for tests of the bf16 path on any machine); unset, the CPU is detected.
Channels-last memory format goes with bf16 on the CPU: oneDNN's bf16 convolutions are fastest in it
(docs/benchmarks.md, "bf16 on the CPU").
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drcapsnet.errors import ConfigError

ENV = "DRCAPS_CPU_BF16"
NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")     # either one: bf16 dot products in hardware
log = logging.getLogger(__name__)
_logged: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """How one run computes: ``dtype`` is what autocast runs matmuls and convolutions in (``torch.float32``: no
    autocast), ``channels_last`` whether the model and its inputs use that memory format, ``reason`` why (logged)."""

    device_type: str
    dtype: torch.dtype
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        """``"bf16"`` or ``"fp32"``: what a checkpoint and a trial record."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context a forward pass runs in: bf16 autocast on this device, or nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch ``x (B, C, H, W)`` in the memory format the model uses (same values, other strides)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:                          # not Linux: no flags to read, so no native bf16 is claimed
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of the first processor in a /proc/cpuinfo text (every core of a machine has the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _torch_bf16() -> bool:
    """PyTorch's own view: oneDNN has bf16 kernels for this CPU (a private op: absent means no)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """``(use bf16 on this CPU, why)``. ``cpuinfo``: a /proc/cpuinfo text (default: this machine's); ``env``: the
    environment (default ``os.environ``), where ``DRCAPS_CPU_BF16`` overrides the detection."""
    forced = (os.environ if env is None else env).get(ENV, "").strip()
    if forced == "0":
        return False, f"{ENV}=0"
    if forced == "1":
        return True, f"{ENV}=1"
    if forced:
        raise ConfigError(f"{ENV}: must be 0 or 1, got {forced!r}; unset it to detect the CPU's bf16")
    flags = cpu_flags(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    native = [f for f in NATIVE_FLAGS if f in flags]
    if not native:
        return False, f"the CPU has no native bf16 ({' or '.join(NATIVE_FLAGS)} not among its /proc/cpuinfo flags)"
    if not _torch_bf16():
        return False, f"the CPU has {native[0]} but PyTorch's oneDNN reports no bf16 support"
    return True, f"the CPU has {', '.join(native)}"


def resolve_precision(device: torch.device, bf16: bool, *, cpuinfo: str | None = None,
                      env: Mapping[str, str] | None = None) -> Precision:
    """The precision a run with ``train.bf16 = bf16`` gets on ``device``; a CPU fallback to fp32 is logged once."""
    if not bf16:
        return Precision(device.type, torch.float32, False, "train.bf16 is false")
    if device.type == "cuda":
        return Precision("cuda", torch.bfloat16, False, "CUDA")
    if device.type != "cpu":
        return _fallback(Precision(device.type, torch.float32, False, f"bf16 is not set up for {device.type}"))
    ok, why = cpu_bf16(cpuinfo, env)
    if not ok:
        return _fallback(Precision("cpu", torch.float32, False, why))
    return Precision("cpu", torch.bfloat16, True, why)


def _fallback(p: Precision) -> Precision:
    message = f"train.bf16: fp32 on {p.device_type} instead of bf16: {p.reason}"
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
    return p
