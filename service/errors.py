"""How request errors are rendered: always a 4xx with JSON, whatever the input held."""

from __future__ import annotations

import json

from fastapi import Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError


async def validation_error(request: Request, error: Exception) -> Response:
    """FastAPI's 422 body (``{"detail": [...]}``), rendered ASCII-safe.

    The default handler echoes the invalid input as UTF-8, which fails (a 500) when the
    input held a lone surrogate; escaping non-ASCII characters keeps it a 422. A body
    that is not UTF-8 at all is echoed with its bad bytes as ``\\xNN`` escapes.
    """
    assert isinstance(error, RequestValidationError)
    detail = jsonable_encoder(error.errors(), custom_encoder={bytes: _escaped})
    body = json.dumps({"detail": detail}, ensure_ascii=True)
    return Response(
        body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, media_type="application/json"
    )


def _escaped(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")
