"""Experiment files: one YAML (or JSON) -> validated, frozen configs; every problem reported at once.

The package, one concept per module: ``schema`` (the search-side dataclasses and the :class:`Experiment`),
``validate`` (a raw mapping -> configs, every problem at once), ``overrides`` (``--set``), ``files`` (read and
write), ``yaml12`` (the YAML loader). Import from here: the names below are the API.

Layout (top-level keys ``name``, ``model``, ``data``, ``train``, ``search``, ``tracking``, ``result``)::

    name: quickstart
    model: {preset: small, units: 8}        # preset values first, then the other keys
    data:  {dataset: digits, batch_size: 64}
    train: {epochs: 6, lr: 5e-2}             # 5e-2 is a float (YAML 1.2 floats, unlike PyYAML's YAML 1.1)
    search:
      metric: val_acc
      space:
        train.lr: {type: float, low: 1.0e-3, high: 2.0e-1, log: true}
    tracking: {experiment: quickstart}

Overrides (``--set train.lr=3.0e-4``, ``--set search.scheduler.name=none``,
``--set search.space.train.lr.high=0.1``) are applied to the raw mapping before validation, so a bad override is
reported exactly like a bad key in the file.

Paths are made absolute on load, because Ray runs trials in another working directory:
``data.data_dir`` relative to the file's folder (``base_dir`` or the cwd for dicts; the cwd for a ``--set``
override), ``tracking.uri`` and ``search.storage`` relative to the cwd when they are a ``sqlite:///relative.db`` URL
or a plain path (``mlruns``). Every other URI is kept as written.
"""

from search.experiment.files import (
    dump_experiment,
    experiment_to_dict,
    load_experiment,
    load_run_config,
    to_plain,
)
from search.experiment.overrides import parse_override
from search.experiment.schema import (
    METRICS,
    SAMPLERS,
    SCHEDULERS,
    SECTIONS,
    TOP_LEVEL,
    ConfirmConfig,
    Experiment,
    ResourcesConfig,
    SchedulerConfig,
    SearchConfig,
    TrackingConfig,
)
from search.experiment.space_spec import PARAM_TYPES, ParamSpec
from search.experiment.validate import experiment_from_dict, run_config_from_dict
from search.experiment.yaml12 import load_yaml

__all__ = ["METRICS", "PARAM_TYPES", "SAMPLERS", "SCHEDULERS", "SECTIONS", "TOP_LEVEL", "Experiment", "ParamSpec",
           "ConfirmConfig", "ResourcesConfig", "SchedulerConfig", "SearchConfig", "TrackingConfig", "dump_experiment",
           "experiment_from_dict", "experiment_to_dict", "load_experiment", "load_run_config", "load_yaml",
           "parse_override", "run_config_from_dict", "to_plain"]
