"""What a finished search leaves for a person: the report (on the parent run and beside the export), the exported
best config and every trial as CSV, and the summary printed at the end of ``drcaps search``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import tracking
from search.plan import SearchPlan
from search.progress import format_value, short_name
from search.publish import front

if TYPE_CHECKING:
    from search.publish import SearchResult


def write_report(result: SearchResult, problems: list[str]) -> str | None:
    """Every search ends with its HTML report: in its Ray folder (a temporary one for remote storage) and on its
    parent run (``report/``). The search is recorded whatever happens here: a failure is a problem to report."""
    from search.report import report_search

    folder = Path(result.experiment_path)
    folder = folder if folder.is_dir() else Path(tempfile.mkdtemp(prefix="drcaps-report-"))
    name = result.experiment.mlflow_experiment
    try:
        return str(report_search(result.tracking_uri, name, result.parent_run_id, folder / "report.html"))
    except Exception as e:     # noqa: BLE001 (said, with the command that makes it later)
        problems.append(f"the report could not be written ({type(e).__name__}: {e}); make it later with: "
                        f"drcaps report {name} --tracking-uri {result.tracking_uri}")
        return None


def with_report(result: SearchResult, report: str | None, problems: list[str]) -> SearchResult:
    return dataclasses.replace(result, report_path=report, problems=tuple(problems))


def exported(result: SearchResult) -> Any:
    """The best trial as an experiment file's content (search/export.py): the exact config it trained, its metrics,
    its run, and, where the search confirmed it, the search's value beside the confirmed mean, spread and count."""
    from search.export import best_experiment

    best, metric = result.best, result.experiment.search.metric
    extra: dict[str, Any] = {"search_value": best.metric}
    if best.number in result.confirmed:
        stats = result.confirmed[best.number]
        extra["confirmed"] = {"metric": metric, "mean": stats["mean"], "std": stats["std"], "n": int(stats["n"])}
    return best_experiment(result.experiment, best.params, metrics=best.metrics, run_id=result.best_run_id,
                           model_uri=result.model_uri, trial_id=best.trial_id, run=result.best_config, extra=extra)


def write_outputs(plan: SearchPlan, result: SearchResult) -> int:
    """The export, the CSV and the report's copy beside the export, then the summary; a failed write is said with
    the command that makes it again (the search is recorded in MLflow): exit code 1, else 0."""
    from search.export import export_best

    path, code = plan.out, 0
    try:
        export_best(exported(result), plan.out)
        front.write_front_yaml(result, plan.out)          # several objectives: NAME.pareto.yaml beside it
        plan.csv.parent.mkdir(parents=True, exist_ok=True)
        tracking.trials_dataframe(result.tracking_uri, result.parent_run_id).to_csv(plan.csv, index=False)
    except OSError as e:
        name = result.experiment.mlflow_experiment
        print(f"error: --out: could not write {plan.out} ({e.strerror or e}); the search is recorded in MLflow "
              f"(parent run {result.parent_run_id} at {result.tracking_uri}): drcaps export-best --experiment "
              f"{name} --tracking-uri {result.tracking_uri} --out FILE", file=sys.stderr)
        code = 1
    report = _copy_report(result, plan.report)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("\n".join(summary_lines(result, export_path=path, csv_path=plan.csv, links=links(plan, result),
                                  report_path=report)))
    return code


def _copy_report(result: SearchResult, out: Path) -> Path | None:
    """The search's report, copied beside the exported config where a person looks for it."""
    if result.report_path is None:
        return None
    try:
        shutil.copyfile(result.report_path, out)
        return out
    except OSError as e:
        print(f"warning: could not copy the report to {out} ({e.strerror or e}); it is at {result.report_path}",
              file=sys.stderr)
        return Path(result.report_path)


def links(plan: SearchPlan, result: SearchResult) -> dict[str, str]:
    """Where to look next: the MLflow UI (and the pages of the search run and the best trial), Optuna Dashboard."""
    from search.cluster_auth import as_published

    uri = result.tracking_uri
    out = {}
    if not uri.startswith(("http://", "https://")):
        out["MLflow UI"] = ("drcaps ui" if plan.default_uri else f"drcaps ui --tracking-uri {uri}") \
            + "   (then open the links below)"
    out["search run (MLflow)"] = as_published(tracking.run_url(uri, result.parent_run_id))   # as a person opens it
    if result.best_run_id:
        out["best trial (MLflow)"] = as_published(tracking.run_url(uri, result.best_run_id))
    out["Optuna Dashboard"] = dashboard_line(result.storage_url)
    return out


def dashboard_line(storage_url: str) -> str:
    """How to open the study in Optuna Dashboard (the password masked). In a stack, its database server is not
    published: the command works only on a machine of the cluster's network, and the line says so."""
    from search.cluster_auth import inside_a_stack
    from search.stores import masked

    server = storage_url.startswith(("postgresql", "mysql"))
    return f"optuna-dashboard {masked(storage_url)}   " + (
        "(from a machine of the cluster's network: its database is not published; the report shows the study)"
        if server and inside_a_stack() else "(pip install optuna-dashboard)")


def outcome_label(outcome: str, error: str | None) -> str:
    """``failed: diverged at epoch 3`` for a failed trial (the last line of its error, without the type name);
    the outcome itself otherwise."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if outcome != "failed" or not lines:
        return outcome
    head, sep, rest = lines[-1].partition(": ")
    reason = rest if sep and head.replace(".", "").replace("_", "").isalnum() and " " not in head else lines[-1]
    return f"failed: {reason.split(';')[0][:60]}"


def confirmation_lines(result: SearchResult) -> list[str]:
    """``search best: trial 0 0.9833; confirmed: trial 2 0.9722 ± 0.0040 over 3 seeds; trial 0 0.9611 ± ...``."""
    if not result.confirmed or result.raw_best is None:
        return []
    raw, best, metric = result.raw_best, result.best, result.experiment.search.metric
    front = result.front                                  # several objectives: raw_best is the front's own pick

    def stat(number: int) -> str:
        s = result.confirmed[number]
        if s["failed"]:
            return f"trial {number} failed {int(s['failed'])} of its runs"
        return f"trial {number} {s['mean']:.4f} ± {s['std']:.4f}"

    seeds = result.experiment.search.confirm.seeds if result.experiment.search.confirm else 0
    others = [stat(n) for n in result.confirmed if n != best.number]
    head = f"search {'pick' if front else 'best'}: trial {raw.number} {raw.metric:.4f}; confirmed: " \
           f"{stat(best.number) if best.number in result.confirmed else 'none'} over {seeds} seeds"
    what = (f"the first {len(result.confirmed)} Pareto front members by search.pick {front.rule} (the rule on the "
            f"confirmed mean of {metric} wins)" if front else
            f"the top {len(result.confirmed)} by {metric} (best mean over new seeds wins)")
    return ["", f"confirmation of {what}:", "  " + "; ".join([head, *others])]


TOP_TAKEN = 10        # taken trials listed in the summary


def taken_lines(result: SearchResult) -> list[str]:
    """The trials a warm start copied, with their runs: shown, not ranked above, never crowned."""
    taken = getattr(result, "taken", ())            # (a stand-in result without the field: none)
    if not taken:
        return []
    metric = result.experiment.search.metric
    out = ["", f"taken from an earlier search without retraining ({len(taken)}; never crowned here, their runs "
               "and checkpoints belong to that search):"]
    for t in taken[:TOP_TAKEN]:
        value = f"{metric} {t.value:.4f}" if t.value is not None else "stopped early"
        link = tracking.run_url(result.tracking_uri, t.run_id) if t.run_id else "no MLflow run recorded"
        out.append(f"  trial {t.number} <- {t.source}  {value}  {link}")
    if len(taken) > TOP_TAKEN:
        out.append(f"  ... and {len(taken) - TOP_TAKEN} more (the report lists every one)")
    return out


def summary_lines(result: SearchResult, *, export_path: Any, csv_path: Any, links: Mapping[str, str],
                  report_path: Any = None, top: int = 10) -> list[str]:
    """What ``drcaps search`` prints when the search is over: the ranked trials, the confirmation, the best config,
    where the export went, and direct links (MLflow runs, Optuna Dashboard)."""
    s = result.experiment.search
    names = list(s.space)
    header = ["rank", "trial", s.metric, "epochs", "outcome", *(short_name(n) for n in names)]
    rows = [[str(i), str(t.number if t.number is not None else t.trial_id),
             f"{t.metric:.4f}" if math.isfinite(t.metric) else "-", str(t.epochs),
             outcome_label(t.outcome, t.error), *(format_value(t.params.get(n)) for n in names)]
            for i, t in enumerate(result.trials[:top], start=1)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    shown = f"top {top} of {len(result.trials)}" if len(result.trials) > top else f"all {len(result.trials)}"
    out = ["", f"trials ranked by their best {s.metric} ({shown}):"]
    out += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    out += confirmation_lines(result) + taken_lines(result) + front.front_lines(result, export_path)
    best = result.best
    confirmed = result.confirmed.get(best.number) if best.number is not None else None
    out += ["", f"best: trial {best.number if best.number is not None else best.trial_id}, {s.metric} "
                f"{best.metric:.4f} at its best epoch ({best.epochs} epochs run)"
            + (f"; confirmed {confirmed['mean']:.4f} ± {confirmed['std']:.4f} over {int(confirmed['n'])} seeds"
               if confirmed else "")]
    out += [f"  {name} = {format_value(value)}" for name, value in best.params.items()]
    out += [f"exported best config: {export_path}", f"all trials (CSV):     {csv_path}"]
    if report_path:
        out.append(f"report:               {report_path}")
    if result.model_uri:
        out.append(f"registered model:     {result.model_uri}")
    out.append(f"retrain from it:      drcaps train --config {export_path}")
    out += [f"{label + ':':<21} {target}" for label, target in links.items()]
    return out
