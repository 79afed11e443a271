# One image for the Ray head, the Ray workers and the MLflow server of docker-compose.yml.
# Not built on the development machines (no Docker engine there); see docs/notes.md.
FROM python:3.11-slim
WORKDIR /opt/drcaps
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY drcapsnet ./drcapsnet
COPY search ./search
COPY experiments ./experiments
RUN pip install --no-cache-dir -c constraints.txt . optuna-dashboard
WORKDIR /work
