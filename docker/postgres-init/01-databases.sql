-- Run once, by the postgres image, on the first start with an empty volume: one database for MLflow's tracking
-- store, one for the Optuna studies (docker-compose.yml).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
