"""drcaps' search side: experiment files, the search on Ray Tune + Optuna, its records in MLflow, the report and the
command line. One concept per module or package; docs/notes.md ("Layout of search/") says which owns what."""
