"""KLSSL_ENVIRONMENT=production: the service refuses to start on placeholder secrets."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from service.settings import PLACEHOLDER_SECRETS, Settings
from tests.deploy.stack import compose, env_example, service_environment

# Secrets only the MLflow server holds (and the clients that log in to it): its start
# command refuses them (tests/deploy/test_mlflow_auth.py runs it), not the api.
MLFLOW_PLACEHOLDERS = ("change-me-mlflow-admin-password", "change-me-mlflow-secret-key")

GOOD = {
    "KLSSL_ENVIRONMENT": "production",
    "KLSSL_API_TOKENS": '{"3f9c1e0d8a7b": "alice"}',
    "KLSSL_RAY_AUTH_TOKEN": "5b2e8f0a9c7d",
    "KLSSL_DATABASE_URL": "postgresql+psycopg://klssl:7d1c0e@postgres:5432/klssl",
    "KLSSL_MLFLOW_TRACKING_URI": "http://mlflow:5000",
}


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_production_settings_with_real_secrets_load(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch, GOOD)
    assert settings.environment == "production"
    assert settings.api_tokens == {"3f9c1e0d8a7b": "alice"}


def test_development_is_the_default_and_allows_no_tokens() -> None:
    settings = Settings(api_tokens={}, ray_auth_token=None)
    assert settings.environment == "development"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"KLSSL_API_TOKENS": "{}"}, "KLSSL_API_TOKENS is empty"),
        ({"KLSSL_API_TOKENS": '{"change-me-api-token": "admin"}'}, "placeholder token"),
        ({"KLSSL_RAY_AUTH_TOKEN": ""}, "KLSSL_RAY_AUTH_TOKEN is unset"),
        ({"KLSSL_RAY_AUTH_TOKEN": "change-me-ray-auth-token"}, "KLSSL_RAY_AUTH_TOKEN"),
        (
            {"KLSSL_DATABASE_URL": "postgresql+psycopg://klssl:change-me-postgres-password@db/k"},
            "KLSSL_DATABASE_URL holds a placeholder",
        ),
        (
            {"KLSSL_MLFLOW_TRACKING_URI": "postgresql://u:change-me-postgres-password@db/m"},
            "KLSSL_MLFLOW_TRACKING_URI holds a placeholder",
        ),
    ],
)
def test_production_refuses_missing_or_placeholder_secrets(
    monkeypatch: pytest.MonkeyPatch, override: dict[str, str], reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason) as caught:
        settings_from(monkeypatch, {**GOOD, **override})
    for secret in PLACEHOLDER_SECRETS:
        assert secret not in str(caught.value), "the error must not echo a secret"


def test_every_placeholder_of_the_env_example_is_known() -> None:
    placeholders = {value for value in env_example().values() if "change-me" in value}
    tokens = {value for value in placeholders if value.startswith("{")}
    assert placeholders - tokens <= set(PLACEHOLDER_SECRETS) | set(MLFLOW_PLACEHOLDERS)
    assert all(any(secret in value for secret in PLACEHOLDER_SECRETS) for value in tokens)


def test_the_api_of_the_example_stack_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose api, with .env.example copied unchanged, fails its settings."""
    api = service_environment(compose()["services"]["api"])
    for name in [name for name in os.environ if name.startswith("KLSSL_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ValidationError, match="production settings refused"):
        settings_from(monkeypatch, api)
    real = {name: value.replace("change-me-", "3f9c1e0d-") for name, value in env_example().items()}
    assert settings_from(monkeypatch, service_environment(compose(real)["services"]["api"]))
