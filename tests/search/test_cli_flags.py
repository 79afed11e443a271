"""The typed flags of ``drcaps train`` come from one table (search/cli.py RUN_FLAGS): each sets the dotted field it
names, through the same validation path as ``--set``."""

from __future__ import annotations

from search.cli import RUN_FLAGS, build_parser, run_overrides
from search.experiment import load_run_config

VALUES = {"--preset": "tiny", "--epochs": "3", "--batch-size": "16", "--lr": "1e-3", "--momentum": "0.8",
          "--optimizer": "adam", "--seed": "5", "--log-interval": "7", "--eval-interval": "1", "--units": "8",
          "--num-iterations": "2", "--routing": "attention", "--dataset": "digits", "--data-dir": "/tmp/d"}


def test_every_flag_sets_the_field_it_names():
    assert sorted(VALUES) == sorted(flag for flag, *_ in RUN_FLAGS)
    argv = ["train", *(x for flag, value in VALUES.items() for x in (flag, value)), "--no-cuda"]
    args = build_parser().parse_args(argv)
    overrides = run_overrides(args)
    run = load_run_config(None, overrides)
    flat = run.flat()
    for flag, field, kind, *_ in RUN_FLAGS:
        if field != "model.preset":                               # a preset is applied, not stored
            assert flat[field] == kind(VALUES[flag]), flag
    assert flat["train.device"] == "cpu"
    assert overrides[-1] == "train.device=cpu"


def test_set_comes_last_so_it_wins_over_a_typed_flag():
    args = build_parser().parse_args(["train", "--lr", "0.1", "--set", "train.lr=0.2"])
    assert load_run_config(None, run_overrides(args)).train.lr == 0.2
