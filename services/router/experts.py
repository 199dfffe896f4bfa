"""The router's expert registry configuration: which experts exist and where their replicas are.

Parsed from a plain dict (as loaded from YAML), for example:

    experts:
      - id: smollm2                 # the model id clients may ask for
        kind: edge                  # a tandem.edge.v1 gRPC edge node
        device: jetson-agx-orin     # a device profile name (services.router.profiles)
        replicas: ["10.0.0.5:50051", "10.0.0.6:50051"]
        token: s3cret               # optional bearer token
      - id: qwen-coder-1.5b
        kind: openai                # any OpenAI-compatible upstream (vLLM, the cloud node, ...)
        device: rtx-4090
        replicas: ["http://cloud:8000/v1"]   # base URLs, up to and including /v1
        model: Qwen/Qwen2.5-Coder-1.5B       # optional upstream model name (default: id)

Every mistake raises `ExpertConfigError` (a ValueError) naming the entry and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from services.router.profiles import DEVICE_PROFILES, DeviceProfile
from services.router.reference import REFERENCE_TIMINGS

ExpertKind = Literal["edge", "openai"]
EXPERT_KINDS: tuple[ExpertKind, ...] = ("edge", "openai")

_REQUIRED = ("id", "kind", "device", "replicas")
_OPTIONAL = ("token", "model", "max_context", "decode_ms_per_token", "prefill_ms_per_token")
DEFAULT_MAX_CONTEXT = 4096


class ExpertConfigError(ValueError):
    """The expert configuration is invalid; the message says where and why."""


@dataclass(frozen=True)
class ExpertConfig:
    """One expert: `replicas` are `host:port` gRPC targets (kind "edge") or base URLs such as
    `http://host:8000/v1` (kind "openai"); `device` names a device profile; `token` is sent as
    `authorization: Bearer <token>`; `model` is the upstream model name (openai; default: id).

    `max_context`: the expert's context length in tokens (the router's own length checks;
    default 4096). `decode_s_per_token` / `prefill_s_per_token`: the expert's per-token times
    on the reference CPU, for the cost model (YAML: `decode_ms_per_token`,
    `prefill_ms_per_token`; default: `services.router.reference` for the shipped models,
    required for any other)."""

    expert_id: str
    kind: ExpertKind
    replicas: tuple[str, ...]
    device: str
    token: str | None = field(default=None, repr=False)
    model: str | None = None
    max_context: int = DEFAULT_MAX_CONTEXT
    decode_s_per_token: float | None = None
    prefill_s_per_token: float | None = None

    @property
    def upstream_model(self) -> str:
        return self.model or self.expert_id


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise ExpertConfigError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _check_address(kind: ExpertKind, address: str, where: str) -> None:
    if kind == "openai":
        if not address.startswith(("http://", "https://")):
            raise ExpertConfigError(
                f"{where}: openai replica {address!r} must be a base URL starting with "
                "http:// or https:// (e.g. http://host:8000/v1)"
            )
        return
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        raise ExpertConfigError(
            f"{where}: edge replica {address!r} must be a host:port gRPC target "
            "(e.g. 127.0.0.1:50051)"
        )


def parse_expert(
    entry: object, *, where: str = "expert", devices: Mapping[str, DeviceProfile] = DEVICE_PROFILES
) -> ExpertConfig:
    """One expert from a dict. Raises ExpertConfigError."""
    if not isinstance(entry, Mapping):
        raise ExpertConfigError(f"{where}: must be a mapping, got {type(entry).__name__}")
    if isinstance(entry.get("id"), str) and entry["id"].strip():
        where = f"{where} ({entry['id'].strip()!r})"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ExpertConfigError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(str(k) for k in entry if k not in _REQUIRED + _OPTIONAL)
    if unknown:
        allowed = ", ".join(_REQUIRED + _OPTIONAL)
        raise ExpertConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")

    expert_id = _string(entry, "id", where)
    kind = _string(entry, "kind", where)
    if kind not in EXPERT_KINDS:
        raise ExpertConfigError(
            f"{where}: unknown kind {kind!r}; expected one of {', '.join(EXPERT_KINDS)}"
        )
    device = _string(entry, "device", where)
    if device not in devices:
        raise ExpertConfigError(
            f"{where}: unknown device profile {device!r}; known: {', '.join(sorted(devices))}"
        )

    raw_replicas = entry["replicas"]
    if isinstance(raw_replicas, str):
        raw_replicas = [raw_replicas]
    if not isinstance(raw_replicas, Sequence) or not raw_replicas:
        raise ExpertConfigError(f"{where}: 'replicas' must be a non-empty list of addresses")
    replicas: list[str] = []
    for i, address in enumerate(raw_replicas):
        if not isinstance(address, str) or not address.strip():
            raise ExpertConfigError(f"{where}: replicas[{i}] must be a non-empty string")
        address = address.strip().rstrip("/")
        _check_address(cast(ExpertKind, kind), address, f"{where}: replicas[{i}]")
        if address in replicas:
            raise ExpertConfigError(f"{where}: replica {address!r} is listed twice")
        replicas.append(address)

    token = _string(entry, "token", where) if entry.get("token") is not None else None
    model = _string(entry, "model", where) if entry.get("model") is not None else None
    max_context = entry.get("max_context", DEFAULT_MAX_CONTEXT)
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 16:
        raise ExpertConfigError(f"{where}: 'max_context' must be an integer >= 16")
    reference = REFERENCE_TIMINGS.get(expert_id)
    times: list[float | None] = []
    for key, ref in (
        ("decode_ms_per_token", reference and reference.decode_s_per_token),
        ("prefill_ms_per_token", reference and reference.prefill_s_per_token),
    ):
        value = entry.get(key)
        if value is None:
            times.append(ref)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ExpertConfigError(f"{where}: {key!r} must be a number >= 0")
        times.append(float(value) / 1000.0)
    return ExpertConfig(
        expert_id=expert_id,
        kind=cast(ExpertKind, kind),
        replicas=tuple(replicas),
        device=device,
        token=token,
        model=model,
        max_context=max_context,
        decode_s_per_token=times[0],
        prefill_s_per_token=times[1],
    )


def parse_experts(
    config: object, *, devices: Mapping[str, DeviceProfile] = DEVICE_PROFILES
) -> tuple[ExpertConfig, ...]:
    """All experts from `{"experts": [...]}` (or the bare list). Raises ExpertConfigError;
    expert ids must be unique and at least one expert is required."""
    entries = config.get("experts") if isinstance(config, Mapping) else config
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise ExpertConfigError("expert config: 'experts' must be a list of expert entries")
    if not entries:
        raise ExpertConfigError("expert config: 'experts' is empty; configure at least one")
    experts = tuple(
        parse_expert(entry, where=f"experts[{i}]", devices=devices)
        for i, entry in enumerate(entries)
    )
    seen: set[str] = set()
    for expert in experts:
        if expert.expert_id in seen:
            raise ExpertConfigError(f"expert config: duplicate expert id {expert.expert_id!r}")
        seen.add(expert.expert_id)
    return experts
