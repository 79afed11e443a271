"""Transition only: the SQLite tuning moved to search/storage.py. search/tracking/client.py still imports
``tune_engine`` from here; once it imports ``search.storage.tune_engine``, delete this file."""

from search.storage import DISABLE_ENV, tune_engine, tuned_optuna_storage

__all__ = ["DISABLE_ENV", "tune_engine", "tuned_optuna_storage"]
