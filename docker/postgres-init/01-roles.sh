# Run once (sourced by the postgres image's entrypoint) on the first start with an empty volume: one login role per
# client, each owning its own databases and nothing else (docker-compose.yml, docs/cluster.md):
#   mlflow  owns mlflow (the tracking store) and mlflow_auth (the basic-auth app's users and permissions)
#   optuna  owns optuna (the studies)
# No one connects as the superuser afterwards. The passwords come from the environment (MLFLOW_DB_PASSWORD,
# OPTUNA_DB_PASSWORD) through psql's \getenv, so they never appear in a process's arguments.
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env (sh docker/make-env.sh)}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD in .env (sh docker/make-env.sh)}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres --no-password <<'SQL'
\getenv mlflow_pw MLFLOW_DB_PASSWORD
\getenv optuna_pw OPTUNA_DB_PASSWORD
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
GRANT CONNECT ON DATABASE mlflow, mlflow_auth TO mlflow;
GRANT CONNECT ON DATABASE optuna TO optuna;
SQL
