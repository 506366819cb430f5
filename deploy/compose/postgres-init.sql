-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- MLflow gets its own database, since both it and the klssl job store keep an Alembic
-- version table and must not share one.
CREATE DATABASE mlflow OWNER klssl;
-- The users and permissions of MLflow's basic-auth app (its own Alembic version table,
-- but a database of its own keeps its tables apart from the tracking store's).
CREATE DATABASE mlflow_auth OWNER klssl;
