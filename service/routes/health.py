"""The probes: ``/healthz`` (the process is up) and ``/readyz`` (its dependencies answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from service.deps import RayDep, StoreDep, TrackingDep
from service.schemas import Check, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check(probe: Callable[[], None]) -> Check:
    try:
        probe()
    except Exception as error:
        return Check(ok=False, error=f"{type(error).__name__}: {error}"[:500])
    return Check(ok=True)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(store: StoreDep, ray: RayDep, tracking: TrackingDep) -> JSONResponse:
    """Database, Ray and MLflow each reachable (503 when one is not)."""
    database, ray_check, mlflow = await asyncio.gather(
        asyncio.to_thread(_check, store.ping),
        asyncio.to_thread(_check, ray.ping),
        asyncio.to_thread(_check, tracking.ping),
    )
    body = Readiness(
        ready=database.ok and ray_check.ok and mlflow.ok,
        checks={"database": database, "ray": ray_check, "mlflow": mlflow},
    )
    code = status.HTTP_200_OK if body.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)
