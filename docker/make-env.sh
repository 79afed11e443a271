#!/bin/sh
# Write .env for docker-compose.yml with fresh random secrets (docs/cluster.md): the Ray token, the MLflow admin's
# password and the server's CSRF key, and one PostgreSQL password per role (superuser, mlflow, optuna).
#   sh docker/make-env.sh            # writes ./.env (mode 600); refuses to overwrite one that exists
#   sh docker/make-env.sh other.env  # or another file
# .env is git-ignored: never commit it. The values are hex, so they need no quoting in URLs or shells.
set -eu
out="${1:-.env}"
if [ -e "$out" ]; then
  echo "make-env: $out exists; keeping it (remove it first to make new secrets: the stack's volumes keep the old" \
       "PostgreSQL and MLflow passwords, so also run 'docker compose down -v')" >&2
  exit 1
fi
secret() { od -An -tx1 -N"${1:-24}" /dev/urandom | tr -d ' \n'; }
umask 077
cat >"$out" <<ENV
# Written by docker/make-env.sh: secrets of this stack only. Never commit this file.
RAY_AUTH_TOKEN=$(secret 32)
MLFLOW_TRACKING_USERNAME=admin
MLFLOW_TRACKING_PASSWORD=$(secret)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)
POSTGRES_PASSWORD=$(secret)
MLFLOW_DB_PASSWORD=$(secret)
OPTUNA_DB_PASSWORD=$(secret)
ENV
sed -n '/^# Optional/,$p' "$(dirname "$0")/../.env.example" >>"$out"
echo "make-env: wrote $out (mode 600)" >&2
