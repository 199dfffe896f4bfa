"""The durable side of cloud sessions, in Redis: a registry entry and an append-only log.

Per session two keys (`{sid}` is a Redis Cluster hash tag, so both live in one slot):

- `<prefix>session:{sid}`, a hash: `owner` (replica id), `uploaded` (positions logged),
  `encoding` + `hidden_size` (of the newest upload), `created` / `updated` (unix time),
  `sampling` (JSON of the session's sampling parameters), `sampler_state` (RNG state of a
  seeded sampler), `last_position` / `last_token` / `last_prob` (the newest answer);
  `speculation` (JSON: epoch, unjudged drafts, newest rollback; speculative sessions);
- `<prefix>log:{sid}`, a stream: one entry per upload with the wire payload as received
  (`start`, `n`, `encoding`, `hidden_size`, `data`, `scales`), and one `truncate` entry per
  rollback of a speculative session (the positions kept).

Both keys expire after the store's idle TTL; every write refreshes it. Writes are Lua
scripts, each atomic and fenced by ownership: a replica appends only while the registry
names it owner and only at the logged end, so the log stays contiguous and a replica that
lost its session to another one finds out at its next write (`OwnershipLost`). The context
manager writes before it changes memory and before it answers the edge, so an
acknowledged position is never lost (within Redis' own durability: appendonly, fsync
every second by default).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from services.cloud_ctx.session_store import LastToken
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft
from tandem.transport.hidden import HiddenPayload


class LogUnavailable(RuntimeError):
    """Redis did not answer; nothing was acknowledged, the edge may retry."""


class OwnershipLost(RuntimeError):
    """Another replica took the session over (or the log moved on); rebuild from the log."""

    def __init__(self, session_id: str, owner: str) -> None:
        super().__init__(f"session {session_id!r} is owned by {owner!r} now")
        self.owner = owner


class LogLost(RuntimeError):
    """The registry entry or log is gone (expired, released, Redis lost data) while this
    replica still held the session in memory: the session is no longer durable."""


@dataclass(frozen=True)
class SessionRecord:
    """What a rebuild needs: the logged payloads in order, and the session's state."""

    session_id: str
    payloads: tuple[tuple[int, HiddenPayload], ...]  # (start_pos, payload), contiguous from 0
    uploaded: int
    previous_owner: str
    sampling: SamplingParams | None
    sampler_state: bytes | None
    last: LastToken | None
    speculation: SpeculativeState | None = None


@dataclass(frozen=True)
class SpeculativeState:
    """What a speculative session must not lose: its epoch, the drafts not yet judged and
    the newest rollback (repeated to the edge's messages of older epochs)."""

    epoch: int
    drafts: tuple[Draft, ...]
    rollback: LastToken | None


_STATUS = """
local function status(h)
  local owner = redis.call('HGET', h, 'owner')
  if not owner then return nil end
  return owner
end
local function refresh(ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
"""

# ARGV: owner, start, n, encoding, hidden_size, data, scales, now, ttl
_APPEND = (
    _STATUS
    + """
local owner = status(KEYS[1])
local start = tonumber(ARGV[2])
if not owner then
  if start ~= 0 then return {'missing', ''} end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'created', ARGV[8], 'uploaded', 0)
elseif owner ~= ARGV[1] then
  return {'owner', owner}
end
local held = tonumber(redis.call('HGET', KEYS[1], 'uploaded') or '0')
if held ~= start then return {'position', tostring(held)} end
redis.call('XADD', KEYS[2], '*', 'start', ARGV[2], 'n', ARGV[3], 'encoding', ARGV[4],
  'hidden_size', ARGV[5], 'data', ARGV[6], 'scales', ARGV[7])
local now_held = held + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'uploaded', now_held, 'encoding', ARGV[4],
  'hidden_size', ARGV[5], 'updated', ARGV[8])
refresh(ARGV[9])
return {'ok', tostring(now_held)}
"""
)

# ARGV: owner, now, ttl
_TOUCH = (
    _STATUS
    + """
local owner = status(KEYS[1])
if not owner then return {'missing', ''} end
if owner ~= ARGV[1] then return {'owner', owner} end
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
refresh(ARGV[3])
return {'ok', redis.call('HGET', KEYS[1], 'uploaded') or '0'}
"""
)

# ARGV: owner, now, ttl, then field/value pairs
_RECORD = (
    _STATUS
    + """
local owner = status(KEYS[1])
if not owner then return {'missing', ''} end
if owner ~= ARGV[1] then return {'owner', owner} end
redis.call('HSET', KEYS[1], 'updated', ARGV[2], unpack(ARGV, 4))
refresh(ARGV[3])
return {'ok', ''}
"""
)

# ARGV: owner, keep, now, ttl
_TRUNCATE = (
    _STATUS
    + """
local owner = status(KEYS[1])
if not owner then return {'missing', ''} end
if owner ~= ARGV[1] then return {'owner', owner} end
local held = tonumber(redis.call('HGET', KEYS[1], 'uploaded') or '0')
local keep = tonumber(ARGV[2])
if keep > held then return {'position', tostring(held)} end
redis.call('XADD', KEYS[2], '*', 'truncate', ARGV[2])
redis.call('HSET', KEYS[1], 'uploaded', keep, 'updated', ARGV[3])
refresh(ARGV[4])
return {'ok', tostring(keep)}
"""
)

# ARGV: owner, now, ttl
_CLAIM = (
    _STATUS
    + """
local owner = status(KEYS[1])
if not owner then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'updated', ARGV[2])
refresh(ARGV[3])
return {owner, redis.call('HGETALL', KEYS[1]), redis.call('XRANGE', KEYS[2], '-', '+')}
"""
)


class SessionLog:
    """Registry + hidden-state log of cloud sessions on the Redis `client` passed in
    (created with the default `decode_responses=False`: payloads are bytes)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        replica_id: str,
        ttl_s: float,
        prefix: str = "tandem:cloud:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("SessionLog needs a Redis client with decode_responses=False")
        self.client = client
        self.replica_id = replica_id
        self.ttl = max(1, math.ceil(ttl_s))
        self.prefix = prefix
        self._clock = clock
        self._append = client.register_script(_APPEND)
        self._touch = client.register_script(_TOUCH)
        self._record = client.register_script(_RECORD)
        self._claim = client.register_script(_CLAIM)
        self._truncate = client.register_script(_TRUNCATE)

    def keys(self, session_id: str) -> tuple[str, str]:
        return (
            f"{self.prefix}session:{{{session_id}}}",
            f"{self.prefix}log:{{{session_id}}}",
        )

    def append(self, session_id: str, start_pos: int, payload: HiddenPayload) -> int:
        """Log rows start_pos.. (must continue the log); returns positions logged."""
        status, value = self._call(
            self._append,
            session_id,
            start_pos,
            payload.n_tokens,
            payload.encoding,
            payload.hidden_size,
            payload.data,
            payload.scales,
            self._clock(),
            self.ttl,
        )
        return self._checked(session_id, status, value)

    def touch(self, session_id: str) -> int:
        """Refresh the TTL and check ownership; returns positions logged."""
        status, value = self._call(self._touch, session_id, self._clock(), self.ttl)
        return self._checked(session_id, status, value)

    def record_token(
        self,
        session_id: str,
        last: LastToken | None,
        sampling: SamplingParams | None = None,
        sampler_state: bytes | None = None,
        speculation: SpeculativeState | None = None,
    ) -> None:
        """Keep the newest answer (and, when given, the sampling parameters, the
        sampler's RNG state after it and a speculative session's state), so a rebuilt
        session answers the same."""
        fields: list[str | bytes | int | float] = []
        if last is not None:
            fields += ["last_position", last.position, "last_token", last.token]
            fields += ["last_prob", repr(last.prob)]
        if speculation is not None:
            fields += ["speculation", _spec_json(speculation)]
        if sampling is not None:
            fields += ["sampling", _sampling_json(sampling)]
        if sampler_state is not None:
            fields += ["sampler_state", sampler_state]
        status, value = self._call(self._record, session_id, self._clock(), self.ttl, *fields)
        self._checked(session_id, status, value)

    def truncate(self, session_id: str, keep: int) -> int:
        """A speculative rollback: only positions [0, keep) stay logged."""
        status, value = self._call(self._truncate, session_id, keep, self._clock(), self.ttl)
        return self._checked(session_id, status, value)

    def claim(self, session_id: str) -> SessionRecord | None:
        """Take ownership and read everything logged; None when nothing is logged."""
        try:
            reply = self._claim(
                keys=self.keys(session_id), args=[self.replica_id, self._clock(), self.ttl]
            )
        except redis.RedisError as exc:
            raise LogUnavailable(f"Redis: {exc}") from exc
        if reply is None:
            return None
        owner, flat, entries = reply
        return _record(session_id, owner.decode(), _pairs(flat), entries)

    def release(self, session_id: str) -> bool:
        try:
            return bool(self.client.delete(*self.keys(session_id)))
        except redis.RedisError as exc:
            raise LogUnavailable(f"Redis: {exc}") from exc

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def _call(self, script, session_id: str, *args) -> tuple[str, str]:
        try:
            status, value = script(keys=self.keys(session_id), args=[self.replica_id, *args])
        except redis.RedisError as exc:
            raise LogUnavailable(f"Redis: {exc}") from exc
        return status.decode(), value.decode()

    @staticmethod
    def _checked(session_id: str, status: str, value: str) -> int:
        if status == "owner":
            raise OwnershipLost(session_id, value)
        if status == "missing":
            raise LogLost(f"session {session_id!r} has no durable log any more")
        if status == "position":  # the log moved past this replica's memory
            raise OwnershipLost(session_id, "(log holds more positions)")
        return int(value) if value else 0


def _pairs(flat: list[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def _sampling_json(p: SamplingParams) -> str:
    return json.dumps({"temperature": p.temperature, "top_p": p.top_p, "seed": p.seed})


def _spec_json(state: SpeculativeState) -> str:
    rb = state.rollback
    return json.dumps(
        {
            "epoch": state.epoch,
            "drafts": [[d.position, d.token, d.q_ids, d.q_probs] for d in state.drafts],
            "rollback": None if rb is None else [rb.position, rb.token, rb.prob],
        }
    )


def _spec_from_json(raw: bytes) -> SpeculativeState:
    d = json.loads(raw)
    rb = d["rollback"]
    return SpeculativeState(
        epoch=int(d["epoch"]),
        drafts=tuple(Draft(int(p), int(t), tuple(q), tuple(w)) for p, t, q, w in d["drafts"]),
        rollback=None if rb is None else LastToken(int(rb[0]), int(rb[1]), float(rb[2])),
    )


def _truncated(payloads: list[tuple[int, HiddenPayload]], keep: int) -> int:
    """Cut logged payloads (in place) to positions [0, keep); returns the new end."""
    while payloads and payloads[-1][0] >= keep:
        payloads.pop()
    if payloads:
        start, p = payloads[-1]
        if start + p.n_tokens > keep:
            payloads[-1] = (start, p.rows(0, keep - start))
        return start + payloads[-1][1].n_tokens
    return 0


def _record(session_id: str, owner: str, h: dict[str, bytes], entries) -> SessionRecord:
    payloads, expected = [], 0
    for _, flat in entries:
        e = _pairs(flat)
        if "truncate" in e:
            expected = _truncated(payloads, int(e["truncate"]))
            continue
        start = int(e["start"])
        if start != expected:
            raise LogLost(f"session {session_id!r}: log entry at {start}, expected {expected}")
        try:
            p = HiddenPayload(
                e["encoding"].decode(),  # type: ignore[arg-type]
                int(e["n"]),
                int(e["hidden_size"]),
                e["data"],
                e["scales"],
            )
        except (KeyError, ValueError) as exc:
            raise LogLost(f"session {session_id!r}: bad log entry at {start}: {exc}") from exc
        payloads.append((start, p))
        expected += p.n_tokens
    uploaded = int(h.get("uploaded", b"0"))
    if expected != uploaded:
        raise LogLost(f"session {session_id!r}: log holds {expected} of {uploaded} positions")
    sampling = None
    if "sampling" in h:
        sampling = SamplingParams(**json.loads(h["sampling"]))
    last = None
    if "last_position" in h:
        last = LastToken(int(h["last_position"]), int(h["last_token"]), float(h["last_prob"]))
    return SessionRecord(
        session_id=session_id,
        payloads=tuple(payloads),
        uploaded=uploaded,
        previous_owner=owner,
        sampling=sampling,
        sampler_state=h.get("sampler_state"),
        last=last,
        speculation=_spec_from_json(h["speculation"]) if "speculation" in h else None,
    )
