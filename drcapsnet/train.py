"""``train(...)``: one DR-CapsNet training run, shared by ``drcaps train``, every search trial and the tests.

The only seam to the outside is the ``report`` callback, called once per epoch with that epoch's metrics
(``drcaps train`` prints them, a Ray trial forwards them to ``tune.report``, tests append them to a list).
This module never imports ray, optuna or mlflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drcapsnet.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from drcapsnet.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from drcapsnet.data import Datasets, Split, iterate_batches, load_datasets, num_batches
from drcapsnet.errors import ConfigError, DivergedError
from drcapsnet.losses import capsnet_loss
from drcapsnet.model import CapsNet
from drcapsnet.precision import Precision, resolve_precision

Report = Callable[[dict[str, float]], None]
_RESUME_ONLY = ("optimizer", "scheduler", "rng")   # in last.pt, not in best.pt


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA where there is none is the user's mistake."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available; "
                          "use train.device=cpu (or --no-cuda)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_compatible(model_cfg: ModelConfig, data: Datasets) -> None:
    """The model's input and class count must match the data: say which field to change if not."""
    problems = [
        f"model.{field}={have} but the data has {want}; set model.{field}={want}"
        for field, have, want in (("in_channels", model_cfg.in_channels, data.in_channels),
                                  ("image_size", model_cfg.image_size, data.image_size),
                                  ("num_classes", model_cfg.num_classes, data.num_classes))
        if have != want
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def compile_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` of a model's training forward (``train.compile``; its backward is compiled with it).

    On CUDA in "reduce-overhead" mode: CUDA graphs replay a step's hundreds of small kernel launches at once, what
    bounds the paper preset's step on an H100/H200 (docs/benchmarks.md). On CPU in the default mode: inductor's
    fused C++ kernels (1.3x the eager step of the paper and small presets on a 2-core Xeon, after ~15 s of
    compiling: worth it for long trainings only). Static shapes; the returned module shares ``model``'s
    parameters, so checkpoints and evaluation keep using ``model`` itself."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation of epoch ``epoch`` depend only on (seed, epoch): resuming needs no saved stream."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def evaluate(model: CapsNet, split: Split, batch_size: int, *, device: torch.device, bf16: bool = True,
             reconstruction_weight: float | None = None, precision: Precision | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``split``; the decoder is masked by the longest capsule.
    ``bf16``: as ``train.bf16`` (bf16 autocast where the device has it natively); ``precision`` overrides it."""
    precision = precision or resolve_precision(device, bf16)
    was_training = model.training
    model.eval()
    weight = model.cfg.reconstruction_weight if reconstruction_weight is None else reconstruction_weight
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in iterate_batches(split, batch_size, shuffle=False, device=device):
        with precision.autocast():
            out = model(precision.images(x))
        total_loss += capsnet_loss(out.lengths.float(), out.reconstruction, x, y, weight) * len(y)
        correct += (out.lengths.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = len(split.labels)
    return total_loss.item() / n, correct.item() / n


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _progress(batches: Iterator[Any], total: int, epoch: int, enabled: bool) -> Any:
    if not enabled:
        return batches
    from tqdm import tqdm  # only the CLI shows a bar
    return tqdm(batches, total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, report: Report | None = None, *,
          checkpoint_dir: str | Path | None = None, resume: str | Path | None = None,
          datasets: Datasets | None = None, progress: bool = False,
          precision: Precision | None = None) -> dict[str, float]:
    """Train one DR-CapsNet; call ``report(metrics)`` once per epoch; return the last epoch's metrics.

    Metrics: ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (on evaluation epochs), ``lr``,
    ``images_per_s`` (training images per second), ``epoch_s``, ``best_val_acc``, and ``test_loss``/``test_acc``
    after the last epoch (the test split is touched only then). With ``checkpoint_dir``, ``last.pt`` is written
    atomically every epoch before ``report`` is called, and ``best.pt`` (weights, config and metrics only: no
    optimizer, scheduler or RNG state) whenever ``val_acc`` improves.
    ``resume`` (a checkpoint file or folder) continues from its epoch and gives the same weights as a run that was
    never interrupted. ``datasets`` skips loading (tests and benchmarks pass them in).
    Precision: ``train.bf16`` through :func:`drcapsnet.precision.resolve_precision` (bf16 autocast on CUDA and on
    CPUs with native bf16, with channels-last there; fp32 elsewhere, the reason logged once); ``precision``
    overrides it (benchmarks compare the variants). Checkpoints record the one used (``"precision"``).
    """
    run = RunConfig(model_cfg, data_cfg, train_cfg)
    if train_cfg.num_threads is not None:
        torch.set_num_threads(train_cfg.num_threads)
    device = resolve_device(train_cfg.device)
    data = (datasets if datasets is not None else load_datasets(data_cfg)).to(device)
    check_compatible(model_cfg, data)

    precision = precision or resolve_precision(device, train_cfg.bf16)

    torch.manual_seed(train_cfg.seed)
    model = CapsNet(model_cfg).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)             # 4-D weights only; same values
    optimizer = _optimizer(model, train_cfg)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train_cfg.lr_decay)
    start_epoch, best_val_acc, best_epoch = 0, -math.inf, 0
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val_acc, best_epoch = state["epoch"], state["best_val_acc"], state["best_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    # Compiled: full batches only (the last, smaller one runs eagerly instead of compiling a second graph).
    compiled = compile_for_training(model, device) if train_cfg.compile else None
    metrics: dict[str, float] = {}
    n_train = len(data.train.labels)
    steps = num_batches(n_train, data_cfg.batch_size)
    for epoch in range(start_epoch + 1, train_cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = iterate_batches(data.train, data_cfg.batch_size, shuffle=True, device=device,
                                  generator=_epoch_generator(train_cfg.seed, epoch), shift_pixels=data_cfg.shift_pixels)
        bar = _progress(batches, steps, epoch, progress)
        for step, (x, y) in enumerate(bar, start=1):
            forward = compiled if compiled is not None and len(y) == data_cfg.batch_size else model
            if forward is compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()           # a new training step: graphs may be reused
            with precision.autocast():                               # weights and loss stay fp32
                out = forward(precision.images(x), y)                # decoder masked by the true label
            loss = capsnet_loss(out.lengths.float(), out.reconstruction, x, y, model_cfg.reconstruction_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.lengths.detach().argmax(dim=1) == y).sum()
            if progress and step % train_cfg.log_interval == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        if not math.isfinite(loss_sum.item()):                       # NaN/inf: no later epoch can recover
            raise DivergedError(epoch, f"train_loss is {loss_sum.item()}")
        metrics = {"epoch": epoch, "train_loss": loss_sum.item() / n_train, "train_acc": correct.item() / n_train,
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": n_train / train_s}
        scheduler.step()

        if epoch % train_cfg.eval_interval == 0 or epoch == train_cfg.epochs:
            val_loss, val_acc = evaluate(model, data.val, data_cfg.batch_size, device=device, precision=precision)
            if not math.isfinite(val_loss):                       # the last step's weights are NaN/inf already
                raise DivergedError(epoch, f"val_loss is {val_loss}")
            metrics.update(val_loss=val_loss, val_acc=val_acc)
            improved = val_acc > best_val_acc
            if improved:
                best_val_acc, best_epoch = val_acc, epoch
        else:
            improved = False
        if epoch == train_cfg.epochs:
            test_loss, test_acc = evaluate(model, data.test, data_cfg.batch_size, device=device, precision=precision)
            metrics.update(test_loss=test_loss, test_acc=test_acc)
        metrics.update(best_val_acc=max(best_val_acc, 0.0), best_epoch=best_epoch,
                       epoch_s=time.perf_counter() - t0)

        if ckpt_dir is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best_val_acc": best_val_acc,
                     "best_epoch": best_epoch, "metrics": dict(metrics), "config": run.to_dict(),
                     "precision": precision.name,
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
            save_checkpoint(state, ckpt_dir / LAST)
            if improved:   # weights only (what rebuilding the model needs): 1/2 to 1/3 of last.pt
                save_checkpoint({k: v for k, v in state.items() if k not in _RESUME_ONLY}, ckpt_dir / BEST)
        if report is not None:
            report(dict(metrics))
    return metrics
