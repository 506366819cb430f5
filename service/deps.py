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
from service.limits import StreamSlots
from service.notifications import Notifier
from service.ray_jobs import RayJobsClient
from service.settings import Settings
from service.store import JobStore
from service.tracking import Tracking

LOCAL_OWNER = "local"
"""The owner of what is submitted while authentication is off (a single local user)."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the owner recorded on what they submit, and what they may see.

    Authentication off (no ``api_tokens``) is its own mode, not an owner name: the one
    local user sees everything. With tokens, an owner sees their own records, an admin
    (``admin_owners``) everyone's.
    """

    owner: str
    sees_everything: bool = False

    def may_see(self, owner: str) -> bool:
        """Whether records of ``owner`` exist for this caller (others are a 404)."""
        return self.sees_everything or owner == self.owner

    @property
    def only_owner(self) -> str | None:
        """The owner a listing is filtered to (None: every owner)."""
        return None if self.sees_everything else self.owner


@dataclass
class Services:
    """What `create_app` builds at startup and the routes use."""

    settings: Settings
    store: JobStore
    ray: RayJobsClient
    tracking: Tracking
    dispatcher: Dispatcher
    log_streams: StreamSlots
    notifier: Notifier


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
) -> Caller:
    """The caller's identity from its bearer token (401 when missing or unknown)."""
    if not settings.api_tokens:
        return Caller(LOCAL_OWNER, sees_everything=True)
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", challenge)
    owner = _owner_of(credentials.credentials, settings.api_tokens)
    if owner is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", challenge)
    return Caller(owner, sees_everything=owner in settings.admin_owners)


async def authenticate_reader(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Caller:
    """Like `authenticate` when ``auth_reads`` is on, else anyone may read everything."""
    if not settings.auth_reads:
        return Caller("", sees_everything=True)
    return await authenticate(credentials, settings)


Owner = Annotated[Caller, Depends(authenticate)]
Reader = Annotated[Caller, Depends(authenticate_reader)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RayDep = Annotated[RayJobsClient, Depends(get_ray)]
TrackingDep = Annotated[Tracking, Depends(get_tracking)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ServicesDep = Annotated[Services, Depends(get_services)]
