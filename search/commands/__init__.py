"""What each ``drcaps`` command does, as typed library functions: ``train_command(config, overrides, *,
save_model=...)`` and the like, each printing what a person reads and returning the exit code. search/cli.py is
the only place that knows argparse; it maps a Namespace to one of these calls and a DrcapsError to an exit code.
Every check that can be made before work starts is made first and raises a
:class:`~drcapsnet.errors.DrcapsError`; anything else is a bug and shows its traceback.

- ``training``: ``train_command``, ``evaluate_command``, ``validate_command`` (one model, one experiment file)
- ``searching``: ``search_command``: plan, run, publish (search/plan.py, search.tune, search/publish/)
- ``cluster``: ``search_through_ray_client`` / ``search_on_head``, the search as one task on a Ray cluster's head
- ``jobs``: ``submit_command`` (``drcaps search --submit``), ``follow_command``: the search as a Ray Job
- ``records``: ``export_best_command``, ``report_command``, ``ui_command`` (read what searches recorded)

The logic they call lives in the library: checkpoint rules in drcapsnet/checkpoint.py, evaluation in
drcapsnet/train.py, up-front checks in search/plan.py and search/preflight.py, the end of a search in
search/publish/, export in search/export.py.
"""

from __future__ import annotations

from search.commands.cluster import search_on_head, search_through_ray_client
from search.commands.jobs import follow_command, submit_command
from search.commands.records import export_best_command, report_command, ui_command
from search.commands.searching import search_command
from search.commands.training import evaluate_command, train_command, validate_command

__all__ = ["evaluate_command", "export_best_command", "follow_command", "report_command", "search_command",
           "search_on_head", "search_through_ray_client", "submit_command", "train_command", "ui_command",
           "validate_command"]

