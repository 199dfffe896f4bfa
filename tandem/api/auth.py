"""Bearer API keys on the OpenAI routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from tandem.api.errors import unauthorized


def check_api_key(request: Request, api_key: str | None) -> None:
    """With an API key configured, require `Authorization: Bearer <key>` (401 otherwise)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(provided=bool(header))
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise unauthorized(provided=True)
