-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- MLflow gets its own database, since both it and the klssl job store keep an Alembic
-- version table and must not share one.
CREATE DATABASE mlflow OWNER klssl;
