"""What ``drcaps --help`` and each command's ``--help`` say to a user: the description, the shared argument texts
and an example session per command (search/cli.py builds the parser from them)."""

from __future__ import annotations

DESCRIPTION = """drcaps searches the hyperparameters of DR-CapsNet (Sabour, Frosst & Hinton 2017, "Dynamic
Routing Between Capsules"): Ray Tune runs each trial, Optuna proposes the values, ASHA stops weak trials early, and
MLflow records every trial and registers the best model. A search is one experiment file (YAML, see experiments/)."""

EXPERIMENT_HELP = ("the experiment file (YAML): name, model, data, train, search (metric, trials, space) and tracking; "
                   "see experiments/quickstart.yaml")
SET_HELP = ("change one field of the experiment file by its dotted name, as in the YAML: --set train.lr=3.0e-4, "
            "--set search.num_samples=40, --set search.space.train.lr.high=0.1 (value read as YAML; repeatable, "
            "the last wins)")
TRACKING_HELP = "MLflow tracking URI: a server (http://...) or sqlite:///FILE (default: sqlite:///mlflow.db here)"

# The examples under each command's --help (RawDescriptionHelpFormatter keeps their lines).
EXAMPLES: dict[str, str] = {
    "drcaps": """a session, from an experiment file to a retrained best model:
  drcaps validate experiments/quickstart.yaml       check the file, every problem at once
  drcaps search experiments/quickstart.yaml         search; export the best config, write the report
  drcaps ui                                         the search's runs in the MLflow UI
  drcaps report quickstart                          the report of the latest quickstart search, again
  drcaps train --config quickstart.best.yaml        retrain from the best config
  drcaps evaluate --model-uri models:/quickstart-capsnet@best

exit codes: 0 done, 2 a bad input (one 'error:' line, before any work starts), 1 a run that failed,
130 interrupted (Ctrl-C)""",
    "train": """examples:
  drcaps train --preset small --dataset digits --epochs 10
  drcaps train --config quickstart.best.yaml        the best config of a search
  drcaps train --set train.lr=3.0e-4 --set model.routing_iterations=2
  drcaps train --load-model m.pt --epochs 20        resume a saved model""",
    "evaluate": """examples:
  drcaps evaluate --model-uri models:/quickstart-capsnet@best
  drcaps evaluate --checkpoint m.pt --dataset mnist --split val""",
    "validate": """examples:
  drcaps validate experiments/quickstart.yaml
  drcaps validate experiments/quickstart.yaml --set search.sampler=random --show-samples 5""",
    "search": """examples:
  drcaps search experiments/quickstart.yaml
  drcaps search experiments/quickstart.yaml --smoke-test          2 trials x 1 epoch, recorded apart
  drcaps search experiments/quickstart.yaml --set search.num_samples=40 --set train.epochs=10
  drcaps search experiments/quickstart.yaml --resume              continue after Ctrl-C
  drcaps search experiments/quickstart.yaml --extend 10           10 more trials of the finished search
  drcaps search narrow.yaml --warm-start quickstart               start from quickstart's trials that fit
  drcaps search experiments/quickstart.yaml --address ray://127.0.0.1:10001 --tracking-uri http://mlflow:5000
  drcaps search experiments/quickstart.yaml --submit http://127.0.0.1:8265   a Ray Job; prints how to follow it""",
    "follow": """examples:
  drcaps follow drcaps-quickstart-1a2b3c            the job's log as it comes; exit code 0 SUCCEEDED,
                                                    130 STOPPED (or Ctrl-C: detached, it keeps running), 1 FAILED
  drcaps follow drcaps-quickstart-1a2b3c --address http://127.0.0.1:8265
  ray job stop --address http://127.0.0.1:8265 drcaps-quickstart-1a2b3c   stop it as Ctrl-C does""",
    "export-best": """examples:
  drcaps export-best --experiment quickstart --out best.yaml
  drcaps export-best --experiment quickstart --out best.json --csv trials.csv""",
    "report": """examples:
  drcaps report quickstart                          writes quickstart.report.html here
  drcaps report quickstart --tracking-uri http://127.0.0.1:5000 --out report.html""",
    "ui": """examples:
  drcaps ui                                         then open http://127.0.0.1:5000
  drcaps ui --tracking-uri sqlite:///elsewhere/mlflow.db --port 5001""",
}
