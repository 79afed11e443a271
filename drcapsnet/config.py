"""One frozen dataclass per concern: the model, the data, the training run.

Each dataclass checks its own values in ``__post_init__``: ``problems()`` lists every one as data (a
:class:`~drcapsnet.errors.Problem`: the dotted field, ``model.routing_iterations``, and what is wrong with the bad
value), and a :class:`ConfigError` (a ``ValueError``) carries them all, so the same name appears in YAML, ``--set``,
the search space, MLflow params and error messages, and callers place problems by field, not by wording.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from drcapsnet.errors import ConfigError, Problem, need, raise_problems

RoutingKind = Literal["dynamic", "attention"]
OptimizerName = Literal["sgd", "adam"]
DeviceName = Literal["auto", "cpu", "cuda"]

ROUTING_KINDS: tuple[str, ...] = ("dynamic", "attention")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "idx")


MAX_WIDTH = 4096      # upper bound of every size field: far above any useful network, far below an out-of-memory one


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelConfig:
    """DR-CapsNet architecture (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules").

    The defaults are the paper's MNIST network: Conv1 256@9x9 -> PrimaryCaps 32 types x 8D (9x9, stride 2)
    -> DigitCaps 10 x 16D, 3 routing iterations, decoder 512-1024-784; 8,215,568 parameters.
    """

    in_channels: int = 1
    image_size: int = 28                 # square inputs; the primary-capsule grid follows from it
    conv_channels: int = 256
    conv_kernel: int = 9
    primary_types: int = 32              # capsule types in PrimaryCaps: 32 x 6 x 6 = 1152 capsules on MNIST
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    num_classes: int = 10
    units: int = 16                      # digit-capsule dimension
    routing_iterations: int = 3          # 1 = uniform coupling (no routing)
    routing: RoutingKind = "dynamic"
    detach_routing: bool = True          # see routing.dynamic_routing: stop gradients through u_hat early
    attention_prior: bool = False        # attention routing only: a learnable prior on the logits
    decoder: bool = True
    decoder_hidden: tuple[int, ...] = (512, 1024)
    reconstruction_weight: float = 0.0005

    def __post_init__(self) -> None:
        # YAML gives lists; keep the dataclass hashable and frozen.
        object.__setattr__(self, "decoder_hidden", tuple(self.decoder_hidden))
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        """Every problem of these values, as data (empty: valid)."""
        out: list[Problem] = []
        sizes = ("in_channels", "image_size", "conv_channels", "conv_kernel", "primary_types", "primary_dim",
                 "primary_kernel", "primary_stride", "units")
        sizes_ok = True
        for name in sizes:
            value = getattr(self, name)
            sizes_ok &= need(out, isinstance(value, int) and value >= 1,
                             f"model.{name}", f"must be an integer >= 1, got {value!r}") \
                and need(out, value <= MAX_WIDTH, f"model.{name}", f"must be at most {MAX_WIDTH}, got {value!r}")
        need(out, isinstance(self.num_classes, int) and self.num_classes >= 2,
             "model.num_classes", f"must be an integer >= 2, got {self.num_classes!r}")
        need(out, isinstance(self.routing_iterations, int) and 1 <= self.routing_iterations <= 10,
             "model.routing_iterations", f"must be an integer in [1, 10], got {self.routing_iterations!r}")
        need(out, self.routing in ROUTING_KINDS,
             "model.routing", f"must be one of {', '.join(ROUTING_KINDS)}, got {self.routing!r}")
        hidden = list(self.decoder_hidden)
        if need(out, all(isinstance(h, int) and h >= 1 for h in hidden),
                "model.decoder_hidden", f"must be a list of integers >= 1, got {hidden!r}"):
            need(out, all(h <= MAX_WIDTH for h in hidden),
                 "model.decoder_hidden", f"each must be at most {MAX_WIDTH}, got {hidden!r}")
        need(out, _finite(self.reconstruction_weight) and self.reconstruction_weight >= 0,
             "model.reconstruction_weight", f"must be a finite number >= 0, got {self.reconstruction_weight!r}")
        if sizes_ok:
            need(out, self.grid_size >= 1, "model.image_size",
                 f"{self.image_size} is too small for conv_kernel={self.conv_kernel}, "
                 f"primary_kernel={self.primary_kernel}, primary_stride={self.primary_stride}")
        return out

    @property
    def grid_size(self) -> int:
        """Side of the primary-capsule grid: 6 for 28x28 inputs, 8 for 32x32."""
        conv_out = self.image_size - self.conv_kernel + 1
        return (conv_out - self.primary_kernel) // self.primary_stride + 1

    @property
    def num_primary_capsules(self) -> int:
        return self.primary_types * self.grid_size * self.grid_size


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's MNIST network: 8,215,568 parameters with the decoder, 6,804,224 without.
    "paper": {},
    # Trains in minutes on 2 CPU cores: 16 x 6 x 6 = 576 primary capsules instead of 1152.
    "small": {"conv_channels": 64, "primary_types": 16, "primary_kernel": 9, "decoder_hidden": (256, 512)},
    # For tests and smoke runs: seconds per epoch.
    "tiny": {"conv_channels": 16, "conv_kernel": 5, "primary_types": 4, "primary_kernel": 5,
             "units": 8, "decoder_hidden": (64,)},
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied: ``model_preset("small", units=8)``."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and batched.

    ``dataset``: ``digits`` (scikit-learn's bundled 8x8 handwritten digits resized to 28x28; no network),
    ``mnist``/``fashion-mnist``/``kmnist``/``cifar10`` (torchvision, downloaded into ``data_dir`` when the
    network allows), or ``idx`` (any folder of ``train-*``/``t10k-*`` IDX files, gzipped or not).
    """

    dataset: str = "digits"
    data_dir: str | None = None          # torchvision root (default ~/.cache/drcaps/data) or IDX folder
    download: bool = True                # torchvision datasets only
    batch_size: int = 128
    val_fraction: float = 0.1            # held out from the training split
    test_fraction: float = 0.2           # only when a dataset has no test split (digits, IDX with t10k only)
    split_seed: int = 0                  # the train/val/test split is fixed by this, not by train.seed
    shift_pixels: int = 2                # random shift by up to this many pixels (the paper's augmentation)
    limit_train: int | None = None       # use at most this many training images (smoke runs)

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        """Every problem of these values, as data (empty: valid)."""
        out: list[Problem] = []
        need(out, self.dataset in DATASETS,
             "data.dataset", f"must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        need(out, self.dataset != "idx" or bool(self.data_dir),
             "data.data_dir", "required when data.dataset is 'idx' (a folder of train-*/t10k-* IDX files)")
        need(out, isinstance(self.batch_size, int) and self.batch_size >= 1,
             "data.batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        fractions_ok = True
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            fractions_ok &= need(out, isinstance(value, (int, float)) and 0.0 < value < 0.9,
                                 f"data.{name}", f"must be a number in (0, 0.9), got {value!r}")
        if fractions_ok:
            need(out, self.val_fraction + self.test_fraction <= 0.95, "data.val_fraction + data.test_fraction",
                 f"must be <= 0.95 to leave training data, got {self.val_fraction} + {self.test_fraction}")
        need(out, isinstance(self.shift_pixels, int) and 0 <= self.shift_pixels <= 8,
             "data.shift_pixels", f"must be an integer in [0, 8], got {self.shift_pixels!r}")
        need(out, self.limit_train is None or (isinstance(self.limit_train, int) and self.limit_train >= 10),
             "data.limit_train", f"must be null or an integer >= 10, got {self.limit_train!r}")
        return out


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimiser, schedule, seed, device, checkpoints."""

    epochs: int = 10
    # The paper's recipe, measured on digits (docs/notes.md, "Training defaults"): Adam 1e-3, decay 0.96 per epoch.
    optimizer: OptimizerName = "adam"
    lr: float = 1.0e-3
    momentum: float = 0.9                # SGD only
    weight_decay: float = 0.0
    lr_decay: float = 0.96               # exponential decay per epoch; 1 = none
    seed: int = 0
    device: DeviceName = "auto"          # auto = CUDA when available
    bf16: bool = True                    # bf16 autocast on CUDA and on CPUs with native bf16 (drcapsnet/precision.py)
    compile: bool = False                # torch.compile the training forward (train.compile_for_training)
    num_threads: int | None = None       # torch CPU threads; the search sets it to the trial's CPUs
    log_interval: int = 10               # batches between progress-bar updates of the running loss
    eval_interval: int = 1               # epochs between validation passes (the last epoch always evaluates)
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        """Every problem of these values, as data (empty: valid)."""
        out: list[Problem] = []
        need(out, isinstance(self.epochs, int) and self.epochs >= 1,
             "train.epochs", f"must be an integer >= 1, got {self.epochs!r}")
        need(out, self.optimizer in OPTIMIZERS,
             "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(out, isinstance(self.lr, (int, float)) and 0.0 < self.lr <= 10.0,
             "train.lr", f"must be a number in (0, 10], got {self.lr!r}")
        need(out, isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0,
             "train.momentum", f"must be a number in [0, 1), got {self.momentum!r}")
        need(out, _finite(self.weight_decay) and self.weight_decay >= 0.0,
             "train.weight_decay", f"must be a finite number >= 0, got {self.weight_decay!r}")
        need(out, isinstance(self.lr_decay, (int, float)) and 0.0 < self.lr_decay <= 1.0,
             "train.lr_decay", f"must be a number in (0, 1], got {self.lr_decay!r}")
        need(out, isinstance(self.seed, int), "train.seed", f"must be an integer, got {self.seed!r}")
        need(out, self.device in DEVICES, "train.device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(out, self.num_threads is None or (isinstance(self.num_threads, int) and self.num_threads >= 1),
             "train.num_threads", f"must be null or an integer >= 1, got {self.num_threads!r}")
        for name in ("log_interval", "eval_interval"):
            value = getattr(self, name)
            need(out, isinstance(value, int) and value >= 1,
                 f"train.{name}", f"must be an integer >= 1, got {value!r}")
        need(out, self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
             "train.grad_clip", f"must be null or a number > 0, got {self.grad_clip!r}")
        return out


@dataclass(frozen=True)
class RunConfig:
    """The three configs of one training run, as the search and ``drcaps train`` pass them around."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (lists, not tuples) ready for YAML, JSON or a checkpoint."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "data", "train")}
        out["model"]["decoder_hidden"] = list(out["model"]["decoder_hidden"])
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, dict[str, Any]]) -> RunConfig:
        return cls(model=ModelConfig(**raw.get("model", {})), data=DataConfig(**raw.get("data", {})),
                   train=TrainConfig(**raw.get("train", {})))

    def flat(self) -> dict[str, Any]:
        """``{"model.units": 16, "train.lr": 0.05, ...}``: the dotted names used everywhere."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}
