"""Admission control at the router: a bounded number of generation requests in flight, in total
and per client, so that a flood cannot queue without limit behind the experts.

A request over either bound is refused at once with **429 and `Retry-After`** (the project's
one overload answer; 503 stays for "not ready"): `rate_limit_exceeded` when the router as a
whole is full, `too_many_requests_per_client` when that client already has its share. A
request holds its slot until its response ends, streams included (the front door frees it
when the last byte is sent or the client goes away).

The client is the API key when keys are configured (so several users behind one proxy are
told apart), else the peer address, or the `x-tandem-client` header when the operator enables
`trust_client_header` (a trusted gateway in front). Counting is per router process.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from starlette.requests import Request

from tandem.api.errors import ApiError

CLIENT_HEADER = "x-tandem-client"


@dataclass(frozen=True)
class AdmissionLimits:
    max_in_flight: int = 64
    max_per_client: int = 16
    retry_after_s: int = 1
    trust_client_header: bool = False

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_per_client < 1 or self.retry_after_s < 1:
            raise ValueError("admission limits must be >= 1")


class Admission:
    """Slot bookkeeping (one event loop: no locks)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.per_client: Counter[str] = Counter()
        self.refused = Counter[str]()

    def client_of(self, request: Request, api_key_configured: bool) -> str:
        if self.limits.trust_client_header and request.headers.get(CLIENT_HEADER):
            return "h:" + request.headers[CLIENT_HEADER][:128]
        auth = request.headers.get("authorization", "")
        if api_key_configured and auth:
            return "k:" + hashlib.sha256(auth.encode()).hexdigest()[:16]  # never the key itself
        peer = request.client.host if request.client else "unknown"
        return "a:" + peer

    def acquire(self, client: str) -> None:
        """Take a slot or raise a 429 ApiError."""
        headers = {"Retry-After": str(self.limits.retry_after_s)}
        if self.in_flight >= self.limits.max_in_flight:
            self.refused["router_full"] += 1
            raise ApiError(
                429,
                f"The router is serving its maximum of {self.limits.max_in_flight} requests; "
                "retry after a short wait.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if self.per_client[client] >= self.limits.max_per_client:
            self.refused["per_client"] += 1
            raise ApiError(
                429,
                f"This client already has {self.limits.max_per_client} requests in flight, "
                "the most one client may have; wait for one to finish.",
                type="rate_limit_error",
                code="too_many_requests_per_client",
                headers=headers,
            )
        self.in_flight += 1
        self.per_client[client] += 1

    def release(self, client: str) -> None:
        self.in_flight -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
