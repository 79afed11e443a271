"""The search space: ``search.space`` entries -> optuna distributions, and sampled params -> a ``RunConfig``.

Pure: no Ray. Optuna is imported inside the functions that need it, so ``apply_params`` (which every trial calls) and
the experiment loader do not pay for it.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from drcapsnet.config import RunConfig
from search.experiment import SAMPLERS, SECTIONS, Experiment, ParamSpec

if TYPE_CHECKING:
    import optuna


def to_distributions(space: Mapping[str, ParamSpec]) -> dict[str, optuna.distributions.BaseDistribution]:
    """``{"train.lr": ParamSpec("float", 1e-4, 1e-1, log=True)}`` -> ``{"train.lr": FloatDistribution(...)}``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in space.items():
        if spec.type == "float":
            out[name] = FloatDistribution(float(spec.low), float(spec.high), log=spec.log,  # type: ignore[arg-type]
                                          step=None if spec.step is None else float(spec.step))
        elif spec.type == "int":
            out[name] = IntDistribution(int(spec.low), int(spec.high), log=spec.log,  # type: ignore[arg-type]
                                        step=1 if spec.step is None else int(spec.step))
        else:
            out[name] = CategoricalDistribution(list(spec.choices))
    return out


def _python(value: Any) -> Any:
    """numpy scalars (what samplers may hand back) -> the Python value."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def _coerce(value: Any, hint: Any) -> Any:
    """Match the field's type: 3.0 -> 3 for int fields, 1 -> 1.0 for float fields; anything else as it is."""
    accepts = set(typing.get_args(hint)) or {hint}
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and int in accepts and float not in accepts and value.is_integer():
        return int(value)
    if isinstance(value, int) and float in accepts and int not in accepts:
        return float(value)
    return value


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted names as they are; a nested ``{"train": {"lr": ...}}`` (a searcher that unflattens) -> dotted."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in SECTIONS and isinstance(value, Mapping):
            out.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            out[name] = value
    return out


def apply_params(exp: Experiment, params: Mapping[str, Any]) -> RunConfig:
    """``exp.run`` with each dotted name in ``params`` replaced; the config's own checks run on the result.

    Raises ``KeyError`` naming an unknown dotted name and ``ValueError`` (from the config) for a value it rejects.
    """
    changes: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in _flatten(params).items():
        section, _, key = str(name).partition(".")
        if section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise KeyError(f"{name}: not a config field (model.*, data.* or train.*)")
        changes[section][key] = _coerce(_python(value), typing.get_type_hints(SECTIONS[section])[key])
    return RunConfig(**{section: dataclasses.replace(getattr(exp.run, section), **values) if values
                        else getattr(exp.run, section) for section, values in changes.items()})


def make_sampler(name: str, seed: int, *, constraints_func: Any = None,
                 population_size: int | None = None) -> optuna.samplers.BaseSampler:
    """The seeded optuna sampler called ``name`` (``search.sampler``); ``constraints_func`` (Optuna's: <= 0 is
    feasible) for TPE, GP and NSGA-II (random ignores it); ``population_size`` for NSGA-II (default: Optuna's 50)."""
    import optuna

    honour = {} if constraints_func is None else {"constraints_func": constraints_func}

    if name not in SAMPLERS:
        raise ValueError(f"search.sampler: must be one of {', '.join(SAMPLERS)}, got {name!r}")
    with warnings.catch_warnings():                        # QMC/GP are "experimental": the user chose them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna 5 deprecates constraints_func (for Trial.set_constraint; removed in 7): it works, said in the notes.
        warnings.filterwarnings("ignore", message=".*constraints_func", category=FutureWarning)
        if name == "tpe":
            # 5 random start-up trials, not Optuna's 10: a 10-trial quickstart never left them, so its "TPE"
            # proposals were all random (issue 9). multivariate: lr and momentum act together; constant_liar: trials
            # running at the same time are not all sent to the same promising point. benchmarks/search_efficiency.py.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True,
                                              **honour)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            # CMA-ES models floats and ints; categoricals (optimizer, batch size) are drawn by its seeded random
            # fallback. Said once in the README rather than warned at every trial.
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, **honour)
        if name == "nsga2":    # a search of fewer trials than its population never leaves its first generation:
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 50,   # make_searcher
                                                 **honour)                                 # sizes it to the budget
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)   # unscrambled Sobol ignores the seed


def sample_space(space: Mapping[str, ParamSpec], seed: int, n: int, sampler: str = "tpe") -> list[dict[str, Any]]:
    """The first ``n`` proposals of the seeded sampler, with optuna alone (no training, no Ray).

    Each trial is told a dummy value (its index) so that model-based samplers advance as in a real study.
    """
    import optuna

    distributions = to_distributions(space)
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per call
    try:
        study = optuna.create_study(sampler=make_sampler(sampler, seed), direction="maximize")
        out: list[dict[str, Any]] = []
        for i in range(n):
            trial = study.ask(fixed_distributions=distributions)
            out.append({name: _python(value) for name, value in trial.params.items()})
            study.tell(trial, float(i))
        return out
    finally:
        optuna.logging.set_verbosity(previous)


CONFIRM_SEED_STEP = 1000   # confirmation seed i trains with train.seed + i * 1000 (and data.split_seed alike)


def trial_run(exp: Experiment, params: Mapping[str, Any], cpus: float, gpus: float,
              confirm_seed: int | None = None, resplit: bool = False) -> RunConfig:
    """The run config a trial trains, exactly: ``params`` applied, ``train.num_threads`` = its CPUs (at least 1),
    CPU unless it holds a GPU. ``confirm_seed`` i (1, 2, ...): a confirmation run, with ``train.seed`` moved by
    i * CONFIRM_SEED_STEP (model init and data order) and, with ``resplit``, ``data.split_seed`` too (a fresh
    validation split from the training data). The export of a trial carries this config, so a retrain matches."""
    run = apply_params(exp, params)
    train = dataclasses.replace(run.train, num_threads=max(1, int(cpus)),
                                device=run.train.device if gpus > 0 else "cpu")
    data = run.data
    if confirm_seed is not None:
        train = dataclasses.replace(train, seed=train.seed + confirm_seed * CONFIRM_SEED_STEP)
        if resplit:
            data = dataclasses.replace(data, split_seed=data.split_seed + confirm_seed * CONFIRM_SEED_STEP)
    return dataclasses.replace(run, train=train, data=data)
