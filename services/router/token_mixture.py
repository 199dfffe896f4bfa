"""Token-level mixing of experts that share a tokenizer (qwen05 + qwen15): MoE²'s mixture,
served token by token.

Every expert runs the request in forced mode (edge gRPC ``Mix``, or a local engine's
``open_forced``): at each position it sends the top-k log-probabilities of its next token;
the router mixes them with the gate's weights,

    p_mix(t) = sum_n w_n p_n(t) / Z,   over the union U of the experts' top-k ids,

where p_n(t) = 0 for an id outside expert n's top-k and Z = sum_{t in U} sum_n w_n p_n(t)
(Z = 1 exactly when every expert sends its whole vocabulary, ``top_k=0``), samples a token
from p_mix with the request's sampling parameters, and sends that token back to every
expert, which appends it to its own KV cache and continues. Text comes from the highest-
weight expert still running (each expert detokenizes the same ids).

Failover: an expert that fails (its stream errors or ends early) is dropped; the rest are
re-weighted (their weights renormalised) and the request continues; only when none is left
does the request fail. Energy: every expert that ran processes the whole sequence, so the
modelled energy is the sum of the experts' modelled energies for the request's shape
(`Predictor.energy_j`), reported like any route (`report.RouteReport`, aggregation
``token mixture``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from services.router.report import RouteReport
from tandem.clients.edge import build_generate_request, chunk_from_proto, error_from_rpc
from tandem.runtime.engine_api import ChatMessage, GenerationChunk
from tandem.runtime.sampling import Sampler, SamplingParams
from tandem_proto.edge.v1 import edge_pb2, edge_pb2_grpc

AGGREGATION = "token mixture"


@dataclass(frozen=True)
class NextToken:
    """One expert's next-token distribution (top-k ids, natural-log probabilities)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


class MixStream(Protocol):
    """One expert's forced-token stream for one request."""

    async def start(self) -> NextToken:
        """Prefill; the first position's distribution."""
        ...

    async def step(self, token: int) -> tuple[GenerationChunk, NextToken | None]:
        """Append ``token``; its chunk and, unless the chunk finished the request, the next
        position's distribution."""
        ...

    async def close(self) -> None: ...


class GrpcMixStream:
    """``MixStream`` over an edge node's ``Mix`` RPC (one bidirectional call per request)."""

    def __init__(
        self,
        stub: edge_pb2_grpc.EdgeNodeStub,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        token_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        top_k: int = 0,
        request_id: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> None:
        self._request = build_generate_request(
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            params=params,
            request_id=request_id,
            whole_answer=False,
        )
        self._stub, self._top_k = stub, top_k
        self._metadata, self._timeout = tuple(metadata), timeout
        self._call: grpc.aio.StreamStreamCall | None = None

    async def _read(self) -> edge_pb2.MixReply:
        assert self._call is not None
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        if msg is grpc.aio.EOF:
            raise ConnectionError("the edge node ended the Mix stream early")
        return msg

    async def _write(self, msg: edge_pb2.MixRequest) -> None:
        assert self._call is not None
        try:
            await self._call.write(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    @staticmethod
    def _next(msg: edge_pb2.MixReply) -> NextToken:
        if msg.WhichOneof("reply") != "next":
            raise ConnectionError(f"expected a distribution, got {msg.WhichOneof('reply')}")
        return NextToken(tuple(msg.next.token_ids), tuple(msg.next.logprobs))

    async def start(self) -> NextToken:
        self._call = self._stub.Mix(metadata=self._metadata, timeout=self._timeout)
        await self._write(
            edge_pb2.MixRequest(start=edge_pb2.MixStart(request=self._request, top_k=self._top_k))
        )
        return self._next(await self._read())

    async def step(self, token: int) -> tuple[GenerationChunk, NextToken | None]:
        await self._write(edge_pb2.MixRequest(token=token))
        msg = await self._read()
        if msg.WhichOneof("reply") != "chunk":
            raise ConnectionError("expected the chosen token's chunk")
        chunk = chunk_from_proto(msg.chunk)
        if chunk.finish_reason is not None:
            return chunk, None
        return chunk, self._next(await self._read())

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            self._call.cancel()


class EngineMixStream:
    """``MixStream`` over an in-process engine's ``open_forced`` (tests, one-process setups)."""

    def __init__(self, engine, request, top_k: int = 0) -> None:
        self._engine, self._request, self._top_k = engine, request, top_k
        self._session = None

    async def _dist(self) -> NextToken:
        item = await self._session.next()
        if isinstance(item, GenerationChunk):
            raise ConnectionError("expected a distribution")
        return NextToken(item.token_ids, item.logprobs)

    async def start(self) -> NextToken:
        self._session = self._engine.open_forced(self._request, self._top_k)
        return await self._dist()

    async def step(self, token: int) -> tuple[GenerationChunk, NextToken | None]:
        self._session.choose(token)
        chunk = await self._session.next()
        if not isinstance(chunk, GenerationChunk):
            raise ConnectionError("expected the chosen token's chunk")
        if chunk.finish_reason is not None:
            return chunk, None
        return chunk, await self._dist()

    async def close(self) -> None:
        if self._session is not None:
            self._session.close()


def mix(
    dists: Mapping[str, NextToken], weights: Mapping[str, float]
) -> tuple[list[int], torch.Tensor]:
    """The mixture over the union of the experts' ids: (ids, log p_mix) (normalised over
    the union; exact when every expert sent its whole vocabulary)."""
    ids = sorted({t for d in dists.values() for t in d.token_ids})
    pos = {t: i for i, t in enumerate(ids)}
    total = sum(weights[e] for e in dists)
    acc = torch.full((len(ids),), -math.inf, dtype=torch.float64)
    for e, d in dists.items():
        lw = math.log(weights[e] / total)
        idx = torch.tensor([pos[t] for t in d.token_ids])
        contrib = torch.full((len(ids),), -math.inf, dtype=torch.float64)
        contrib[idx] = torch.tensor(d.logprobs, dtype=torch.float64) + lw
        acc = torch.logaddexp(acc, contrib)
    return ids, acc - torch.logsumexp(acc, 0)


@dataclass
class MixStep:
    """What the router served at one position: the token and its mixture log-probability,
    and the full mixture (ids, log p) for checks."""

    token: int
    logprob: float
    ids: list[int]
    log_mix: torch.Tensor
    experts: tuple[str, ...]  # the experts mixed at this position


@dataclass
class MixResult:
    steps: list[MixStep] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def mix_generate(
    streams: Mapping[str, MixStream],
    weights: Mapping[str, float],
    params: SamplingParams,
    *,
    report: RouteReport | None = None,
    result: MixResult | None = None,
    energy_j: Mapping[str, float] | None = None,
) -> AsyncIterator[GenerationChunk]:
    """Serve one request from the token mixture of ``streams`` (all sharing a tokenizer),
    yielding the text chunks of the highest-weight expert alive. ``result`` (optional)
    records every step's mixture; ``report`` gets the experts that ran and failed and, with
    ``energy_j`` (each expert's modelled energy for the request), their summed energy."""
    result = result if result is not None else MixResult()
    sampler = Sampler(params)
    order = sorted(streams, key=lambda e: -weights[e])
    alive: dict[str, NextToken] = {}
    if report is not None:
        report.aggregation = AGGREGATION
        report.experts = list(order)
        report.weights = {e: weights[e] for e in order}
        if energy_j is not None:
            report.energy_j = energy_of(order, energy_j)

    def fail(e: str) -> None:
        alive.pop(e, None)
        result.failed.append(e)
        if report is not None:
            report.failed.append(e)

    async def guarded(e: str, coro):
        try:
            return e, await coro, None
        except Exception as exc:  # one expert's failure: the rest carry on
            return e, None, exc

    try:
        for e, first, exc in await asyncio.gather(*(guarded(e, streams[e].start()) for e in order)):
            if exc is None:
                alive[e] = first
            else:
                fail(e)
        while True:
            if not alive:
                raise ConnectionError(f"every expert of the token mixture failed ({result.failed})")
            ids, log_mix = mix(alive, weights)
            idx, _ = sampler.sample(log_mix.float())
            token = ids[idx]
            result.steps.append(MixStep(token, float(log_mix[idx]), ids, log_mix, tuple(alive)))
            outs = await asyncio.gather(*(guarded(e, streams[e].step(token)) for e in list(alive)))
            primary = next(e for e in order if e in alive)
            chunks: dict[str, GenerationChunk] = {}
            for e, out, exc in outs:
                if exc is not None:
                    fail(e)
                    continue
                chunk, nxt = out
                chunks[e] = chunk
                if nxt is not None:
                    alive[e] = nxt
            text_from = (
                primary if primary in chunks else next((e for e in order if e in chunks), None)
            )
            if text_from is None:
                continue  # everyone failed on this token: the loop raises
            chunk = chunks[text_from]
            if report is not None:
                report.answered_by = text_from
            yield chunk
            if chunk.finish_reason is not None:
                return
            # The text expert finished but others did not (cannot happen with one tokenizer
            # and the same limits): stop at the text expert.
    finally:
        await asyncio.gather(*(s.close() for s in streams.values()), return_exceptions=True)


@dataclass
class TokenMixer:
    """Which experts the router may mix token by token: those whose tokenizer (the
    registry's ``ModelSpec.tokenizer``) is the same, and whose engine can open a forced
    stream (``open_mix(request, top_k)``, e.g. `expert_engine.ExpertEngine`)."""

    groups: Mapping[str, str]  # expert id -> tokenizer identity
    top_k: int = 64  # ids per expert and position on the wire (0: the whole vocabulary)

    def mixable(self, experts: Sequence[str], engines: Mapping[str, object]) -> bool:
        names = {self.groups.get(e) for e in experts}
        return (
            len(experts) > 1
            and None not in names
            and len(names) == 1
            and all(hasattr(engines[e], "open_mix") for e in experts)
        )

    def open(self, engine, request) -> MixStream:
        return engine.open_mix(request, self.top_k)

    @staticmethod
    def from_registry(experts: Sequence[str], top_k: int = 64) -> TokenMixer:
        from tandem.models.registry import ModelRegistry

        registry = ModelRegistry()
        groups = {}
        for e in experts:
            try:
                groups[e] = registry.get(e).tokenizer
            except KeyError:
                continue
        return TokenMixer(groups, top_k)


def energy_of(experts: Sequence[str], energy: Mapping[str, float]) -> float:
    """Modelled energy of a token mixture: every expert that ran processed the sequence."""
    return float(sum(energy[e] for e in experts))
