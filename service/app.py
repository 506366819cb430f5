"""The app factory: `create_app(settings)` wires the store, Ray, MLflow and the routes.

``uvicorn --factory service.app:app_from_env`` serves an app configured from the
``KLSSL_*`` environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import Services
from service.dispatcher import Dispatcher
from service.errors import validation_error
from service.limits import BodyLimit, StreamSlots
from service.notifications import Notifier, payload
from service.ray_jobs import RayJobs, RayJobsClient
from service.routes import health, jobs, sweeps
from service.schemas import SweepCreate
from service.settings import Settings
from service.store import JobStore
from service.tracking import Tracking

log = logging.getLogger(__name__)


class JobsByState(Collector):
    """``klssl_jobs{state}``: read from the store at every scrape."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("klssl_jobs", "Jobs by state.", labels=["state"])
        for state, count in self.store.count_by_state().items():
            family.add_metric([state.value], count)
        yield family


class RequestLatency:
    """Pure ASGI middleware that observes every HTTP request's latency by route.

    Not ``@app.middleware("http")``: Starlette's `BaseHTTPMiddleware` wraps every request
    in an extra task and memory streams, which cost more than the status read itself.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route, str(status_code)).observe(
                time.perf_counter() - start
            )


def create_app(
    settings: Settings,
    *,
    ray_client: RayJobsClient | None = None,
    tracking: Tracking | None = None,
    run_dispatcher: bool = True,
) -> FastAPI:
    """The control-plane app for ``settings``.

    Args:
        settings: the service settings.
        ray_client: the Ray Jobs client (default: `RayJobs` on ``settings.ray_address``).
        tracking: the MLflow side (default: on ``settings.mlflow_tracking_uri``).
        run_dispatcher: run the dispatcher and notifier loops in the background (tests
            drive them by hand).
    """
    store = JobStore.from_url(settings.database_url, functools.partial(payload, settings=settings))
    ray = ray_client if ray_client is not None else RayJobs(settings)
    tracking = tracking or Tracking(
        settings.mlflow_tracking_uri, timeout_s=settings.request_timeout_s
    )
    dispatcher = Dispatcher(store, ray, tracking, settings)
    notifier = Notifier(store, settings)
    services = Services(
        settings,
        store,
        ray,
        tracking,
        dispatcher,
        StreamSlots(settings.max_log_streams_per_owner),
        notifier,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(dispatcher.run()) if run_dispatcher else None
        # Its own loop: a webhook receiver that is down or slow never holds a round.
        delivery = asyncio.create_task(notifier.run()) if run_dispatcher else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                with contextlib.suppress(Exception):  # the lease expires anyway
                    await asyncio.to_thread(dispatcher.resign)
            if delivery is not None:
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await delivery
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(notifier.resign)
            store.engine.dispose()

    app = FastAPI(
        title="klssl",
        summary="Training service for self-supervised learning by clustering.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    store.create_schema()  # Alembic upgrade head, before the first request

    registry = CollectorRegistry()
    registry.register(JobsByState(store))
    latency = Histogram(
        "klssl_request_duration_seconds",
        "HTTP request latency.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestLatency, histogram=latency)  # outermost: times the 413s too

    @app.get("/metrics", tags=["health"], include_in_schema=True)
    def metrics() -> Response:
        """Prometheus metrics: jobs by state, request latency."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(sweeps.router)
    with_models_in_openapi(app, [SweepCreate])
    return app


def with_models_in_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add ``models`` to the app's OpenAPI components: bodies that routes read themselves
    (`service.routes.common.body_off_the_loop`) are referenced there by name."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """An app configured from the environment (for ``uvicorn --factory``)."""
    return create_app(Settings())
