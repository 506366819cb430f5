"""FastAPI dependencies: the app's services and the caller's identity.

They are ``async`` on purpose although they never await: they only read memory, and
FastAPI runs a plain ``def`` dependency in its thread pool, one hop per dependency per
request, which dominated the latency of status reads under load.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.dispatcher import Dispatcher
from service.ray_jobs import RayJobsClient
from service.settings import Settings
from service.store import JobStore
from service.tracking import Tracking

ANONYMOUS = "anonymous"


@dataclass
class Services:
    """What `create_app` builds at startup and the routes use."""

    settings: Settings
    store: JobStore
    ray: RayJobsClient
    tracking: Tracking
    dispatcher: Dispatcher


async def get_services(request: Request) -> Services:
    """The app's services (set by `create_app`)."""
    services: Services = request.app.state.services
    return services


async def get_settings(services: Annotated[Services, Depends(get_services)]) -> Settings:
    """The app's settings."""
    return services.settings


async def get_store(services: Annotated[Services, Depends(get_services)]) -> JobStore:
    """The job store."""
    return services.store


async def get_ray(services: Annotated[Services, Depends(get_services)]) -> RayJobsClient:
    """The Ray Jobs client."""
    return services.ray


async def get_tracking(services: Annotated[Services, Depends(get_services)]) -> Tracking:
    """The MLflow side."""
    return services.tracking


async def get_dispatcher(services: Annotated[Services, Depends(get_services)]) -> Dispatcher:
    """The dispatcher (to wake it after a submission)."""
    return services.dispatcher


bearer = HTTPBearer(auto_error=False, description="An API token from KLSSL_API_TOKENS.")


def _owner_of(presented: str, tokens: dict[str, str]) -> str | None:
    """The owner of ``presented``; every token is compared, in constant time."""
    owner = None
    for token, who in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            owner = who
    return owner


async def authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str:
    """The caller's identity from its bearer token (401 when missing or unknown)."""
    if not settings.api_tokens:
        return ANONYMOUS
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", challenge)
    owner = _owner_of(credentials.credentials, settings.api_tokens)
    if owner is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", challenge)
    return owner


async def authenticate_reader(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str:
    """Like `authenticate` when ``auth_reads`` is on, else anyone may read."""
    if not settings.auth_reads:
        return ANONYMOUS
    return await authenticate(credentials, settings)


Owner = Annotated[str, Depends(authenticate)]
Reader = Annotated[str, Depends(authenticate_reader)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RayDep = Annotated[RayJobsClient, Depends(get_ray)]
TrackingDep = Annotated[Tracking, Depends(get_tracking)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
