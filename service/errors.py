"""How request errors are rendered: always a 4xx with JSON, whatever the input held."""

from __future__ import annotations

import json

from fastapi import Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError


async def validation_error(request: Request, error: Exception) -> Response:
    """FastAPI's 422 body (``{"detail": [...]}``), rendered ASCII-safe.

    The default handler echoes the invalid input as UTF-8, which fails (a 500) when the
    input held a lone surrogate; escaping non-ASCII characters keeps it a 422.
    """
    assert isinstance(error, RequestValidationError)
    body = json.dumps({"detail": jsonable_encoder(error.errors())}, ensure_ascii=True)
    return Response(
        body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, media_type="application/json"
    )
