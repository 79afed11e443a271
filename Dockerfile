# One image for every service of docker-compose.yml that runs drcaps code: the Ray head, the Ray workers and the MLflow
# server (docs/cluster.md). Python 3.11 as on the host, the exact versions of constraints.txt (a Ray Client must match
# the cluster's Ray and Python), psycopg2 for the PostgreSQL stores, Ray's dashboard (ray[default]: the head serves
# the Ray Jobs API on 8265 with it; without it `ray job submit` cannot connect) and MLflow's basic-auth app
# (mlflow[auth]: Flask-WTF). torch from PyPI is the CUDA build: the same image runs CPU-only and GPU workers.
FROM python:3.11-slim
WORKDIR /opt/drcaps
# Dependencies first, from the project metadata alone (README.md, which pyproject names, as an empty stand-in), so
# that editing the code or the README re-runs only the last, small layers.
COPY pyproject.toml constraints.txt ./
RUN mkdir -p drcapsnet search && touch drcapsnet/__init__.py search/__init__.py README.md \
    && pip install --no-cache-dir -c constraints.txt ".[cluster,dashboard]" "ray[default]" "mlflow[auth]" \
    && pip uninstall -y -q drcaps
COPY README.md ./
COPY drcapsnet ./drcapsnet
COPY search ./search
COPY experiments ./experiments
RUN pip install --no-cache-dir --no-deps . && drcaps --help >/dev/null
ENV RAY_USAGE_STATS_ENABLED=0
# The working folder of every service: `drcaps search experiments/quickstart.yaml` finds the bundled experiments,
# and the export lands here; /work/drcaps-runs is Ray's storage (the compose `runs` volume).
RUN mkdir -p /work && ln -s /opt/drcaps/experiments /work/experiments
WORKDIR /work
