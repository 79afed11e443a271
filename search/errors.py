"""Errors only a search can meet, under the one root :class:`~drcapsnet.errors.DrcapsError` (the model library
keeps the input errors every command shares; search/cli.py maps each class to an exit code).
"""

from __future__ import annotations

from drcapsnet.errors import DrcapsError


class ClusterError(DrcapsError):
    """Ray could not be started or reached, lacks the resources asked for, or there is no search to resume."""


class BusyError(DrcapsError):
    """Another search of the same experiment is running in the same storage folder."""


class SearchFailedError(DrcapsError):
    """A search ran but produced no usable result (every trial failed), or its end (export) could not be written;
    the message says where the recorded results are."""
