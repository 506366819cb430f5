"""Schema fuzzing: every operation of the OpenAPI, with a valid token, never answers 5xx.

Schemathesis generates requests from the app's own OpenAPI (bodies that follow the
TrainConfig and SweepConfig schemas, and ones that break them; odd ids, offsets and
strings) against the real app, its real SQLite job store and a real SQLite MLflow store;
only Ray is the fake of `tests.service.conftest`. A bounded number of examples per
operation keeps it to tens of seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ALICE, TOKENS, FakeRay

EXAMPLES = 25
"""Generated requests per operation (Hypothesis stops earlier for small schemas)."""


def fuzzed_app() -> FastAPI:
    """The app on throwaway stores (built at import: the schema is read at collection)."""
    base = Path(tempfile.mkdtemp(prefix="klssl-fuzz-"))
    root = base / "data"
    (root / "images" / "a").mkdir(parents=True)
    return create_app(
        Settings(
            database_url=f"sqlite:///{base / 'jobs.db'}",
            mlflow_tracking_uri=f"sqlite:///{base / 'mlflow.db'}",
            storage_path=str(base / "storage"),
            api_tokens=TOKENS,
            allowed_data_roots=[root],
            ray_address="http://127.0.0.1:1",
        ),
        ray_client=FakeRay(),
        run_dispatcher=False,
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app())


@pytest.fixture(autouse=True)
def ieee_floats() -> None:
    """Hypothesis refuses to generate floats while denormals flush to zero, which
    `trainer.loop.build_run` turns on process-wide (for speed) in earlier tests."""
    import torch

    torch.set_flush_denormal(False)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared, loaded machine: time is not what is tested
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples in every run: a failure reproduces
)
def test_no_request_is_a_server_error(case: schemathesis.Case) -> None:
    if case.path.endswith("/logs") and case.query and case.query.get("follow") in (True, "true"):
        case.query["follow"] = "false"  # a live stream ends only with its job
    response = case.call(headers=ALICE)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} {case.query} {case.body!r:.500} -> "
        f"{response.status_code} {response.text[:500]}"
    )
