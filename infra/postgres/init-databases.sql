-- Runs once, when the postgres container starts on an empty data volume
-- (docker-entrypoint-initdb.d). One database per consumer, all owned by POSTGRES_USER.
CREATE DATABASE mlflow;       -- MLflow backend store (experiments, runs, registry)
CREATE DATABASE mlflow_auth;  -- MLflow basic-auth users and permissions
CREATE DATABASE optuna;       -- Optuna RDB storage (MAMMOFLOW_OPTUNA_STORAGE)
CREATE DATABASE prefect;      -- Prefect server database
