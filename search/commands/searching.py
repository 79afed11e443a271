"""``drcaps search`` here (Ray started here, or joined with ``--address auto|HOST:PORT``): plan (every up-front
check, search/plan.py), run (search.tune.run_search), publish (search/publish/: @best, report, export, summary).
A ``ray://`` address runs the same three steps on the cluster's head (search/commands/cluster.py; search/cli.py
chooses).
"""

from __future__ import annotations

import sys
from pathlib import Path


def search_command(experiment: Path, overrides: list[str], *, address: str | None = None,
                   tracking_uri: str | None = None, storage_path: Path | None = None, out: Path | None = None,
                   resume: bool = False, smoke_test: bool = False, verbose: int = 0, extend: int | None = None) -> int:
    """Run the search of the experiment file ``experiment`` (with the dotted ``overrides``) on Ray (here, or the
    cluster at ``address``), tracked at ``tracking_uri``, Ray's results under ``storage_path``; export the best
    trial's config to ``out`` (default ``<experiment name>.best.yaml`` here). ``resume`` continues an interrupted
    search; ``smoke_test``: 2 trials x 1 epoch on few images; ``verbose``: also Ray Tune's own tables and logs;
    ``extend``: N more trials of the latest finished search (same study, parent run, report and @best)."""
    from search.plan import make_plan
    from search.publish import publish
    from search.publish.outputs import write_outputs
    from search.tune import run_search

    plan = make_plan(experiment, overrides, address=address, tracking_uri=tracking_uri, storage_path=storage_path,
                     out=out, resume=resume, smoke_test=smoke_test, extend=extend)
    try:
        records = run_search(plan, verbose=1 + verbose)
    except KeyboardInterrupt:
        print(f"interrupted: the search's state is saved; continue it with\n  {plan.resume_command()}",
              file=sys.stderr)
        return 130
    return write_outputs(plan, publish(plan, records))
