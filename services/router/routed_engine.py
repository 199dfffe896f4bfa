"""`RoutedEngine`: the `Engine` the router's front door serves, one per model id.

- direct (`selector=None`): the client named an expert; it serves (replica failover happens
  inside that expert's engine), after the budget check.
- auto (`selector` set, model id "auto"): MoE². The coarse level picks S under the budgets
  (cached per budget class), the gate ranks S on the prompt's features, the top k run.

Running the chosen experts:

- streaming: the top-ranked expert streams; if it fails before its first chunk the next one
  in S takes over (every member of S meets the budgets). k > 1 does not run extra experts for a
  stream (there is no answer to vote on until every stream ends); the rest of S is only the
  failover order. An expert that fails after its first chunk ends the stream with an error.
- non-streaming: the top k run in parallel and `aggregate.weighted_vote` picks the answer;
  an expert that fails (even half-way: nothing was sent yet) is replaced by the next in S.
  Where `picks` holds a pick for the k experts (`self_score.SelfScorePicks`: experts that
  cannot be token-mixed), each expert also returns its score of the prompt and the pick
  (`SelfScoreTop1.choose`) chooses the answer; the vote decides only when that is not
  possible (an expert of the k sent no score and the pick's prior did not answer).

Failover order: S by gate weight, then the healthy experts outside S that meet the budgets on
their own (best single-expert validation loss first), so a request whose S is one expert still
survives that expert dying, within its budgets.

Every request gets a `RouteReport` (experts, modelled energy, predicted and measured latency)
in the request's `RouteContext` (for the response headers) and in the final chunk's `report`
(for `usage.tandem.router`). Each finished expert call feeds the latency telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace

from services.router.aggregate import RULE, Answer, weighted_vote
from services.router.budget import ENERGY_FIELD, LATENCY_FIELD, BudgetDefaults, RequestBudget
from services.router.expert_engine import ExpertUnavailable, score_prompt, whole_answer
from services.router.features import Featurizer, gate_text
from services.router.metrics import RouterMetrics
from services.router.moe2 import BudgetInfeasible, Moe2Selector
from services.router.predictor import Predictor, Shape
from services.router.report import RouteReport
from services.router.self_score import AGGREGATION as SELF_SCORE
from services.router.self_score import PromptScore, SelfScorePicks
from services.router.token_mixture import AGGREGATION as TOKEN_MIXTURE
from services.router.token_mixture import TokenMixer, mix_generate
from tandem.runtime.engine_api import ChatMessage, Engine, GenerationChunk, GenerationRequest


@dataclass
class RouteContext:
    """Per request, set by the front door: the budgets, whether the client streams, and the
    report the engine fills in."""

    budget: RequestBudget
    stream: bool
    report: RouteReport | None = None


route_context: contextvars.ContextVar[RouteContext | None] = contextvars.ContextVar(
    "tandem_route_context", default=None
)


class RoutedEngine:
    def __init__(
        self,
        model_id: str,
        experts: Mapping[str, Engine],
        predictor: Predictor,
        *,
        selector: Moe2Selector | None = None,
        featurizer: Featurizer | None = None,
        defaults: BudgetDefaults | None = None,
        metrics: RouterMetrics | None = None,
        mixer: TokenMixer | None = None,
        picks: SelfScorePicks | None = None,
    ) -> None:
        if selector is None and model_id not in experts:
            raise ValueError(f"no expert {model_id!r} to route to")
        if selector is not None and featurizer is None:
            raise ValueError("auto routing needs a featurizer for the gate")
        self.model_id = model_id
        self.experts = dict(experts)
        self.predictor = predictor
        self.selector = selector
        self.mixer = mixer  # token-level mixing of the top k where their tokenizers match
        self.picks = picks  # k > 1 elsewhere: the pick by the experts' prompt scores
        self.featurizer = featurizer
        self.defaults = defaults or BudgetDefaults()
        self.metrics = metrics
        members = selector.experts if selector is not None else (model_id,)
        self._members = tuple(e for e in members if e in self.experts)
        if not self._members:
            raise ValueError("no configured expert engine for the gate's experts")
        first = self.experts[self._members[0]]
        self.max_context = min(self.experts[e].max_context for e in self._members)
        self.n_layers = first.n_layers

    # -- Engine --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[int, ...]:
        return self.experts[self._members[0]].encode_prompt(prompt)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        return self.experts[self._members[0]].encode_chat(messages)

    def queue_depth(self) -> int:
        return sum(self.experts[e].queue_depth() for e in self._members)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        ctx = route_context.get()
        if ctx is None:
            ctx = RouteContext(self.defaults.request(), stream=True)
        return self._generate(request, ctx)

    # -- routing -------------------------------------------------------------------------

    async def _plan(
        self, request: GenerationRequest, ctx: RouteContext
    ) -> tuple[RouteReport, list[str]]:
        """The report so far and the order to try experts in: S by gate weight (the first k
        run), then the fallbacks outside S that meet the budgets alone."""
        budget = ctx.budget
        shape = Shape.estimate(len(request.prompt_ids), request.params.max_tokens)
        fallbacks: tuple[str, ...] = ()
        if self.selector is None:
            ranked: tuple[tuple[str, float], ...] = ((self.model_id, 1.0),)
            met = self._direct_fits(self.model_id, shape, budget)
            subset: Sequence[str] = (self.model_id,)
        else:
            coarse = self.selector.coarse(budget, shape)
            if not coarse.subset:
                raise ExpertUnavailable("no healthy expert can serve model 'auto' right now")
            subset, met, fallbacks = coarse.subset, coarse.budget_met, coarse.fallbacks
            features = None
            if len(subset) > 1:
                assert self.featurizer is not None
                t0 = time.perf_counter()
                features = await self.featurizer.features(gate_text(request))
                if self.metrics is not None:
                    self.metrics.features.observe(time.perf_counter() - t0)
            ranked = self.selector.rank(features, subset)  # type: ignore[arg-type]
        k = min(budget.top_k, len(ranked))
        chosen = [e for e, _ in ranked[:k]]
        report = RouteReport(
            selection="direct" if self.selector is None else "auto",
            budget=budget.as_dict(),
            subset=list(subset),
            weights=dict(ranked),
            top_k=k,
            experts=chosen,
            energy_j=sum(self.predictor.energy_j(e, shape) for e in chosen),
            latency_predicted_ms=max(self.predictor.predicted_s(e, shape) for e in chosen) * 1e3,
            budget_met=met,
            aggregation=RULE if k > 1 and not ctx.stream else "single",
        )
        if k > 1 and self.mixer is not None and self.mixer.mixable(chosen, self.experts):
            report.aggregation = TOKEN_MIXTURE
        elif report.aggregation == RULE and self.picks is not None and self.picks.get(chosen):
            report.aggregation = SELF_SCORE
        ctx.report = report
        return report, [e for e, _ in ranked] + list(fallbacks)

    def _direct_fits(self, expert: str, shape: Shape, budget: RequestBudget) -> bool:
        t = self.predictor.predicted_s(expert, shape) * 1e3
        j = self.predictor.energy_j(expert, shape)
        late = budget.latency_ms is not None and t > budget.latency_ms
        costly = budget.energy_j is not None and j > budget.energy_j
        if (late or costly) and not budget.best_effort:
            raise BudgetInfeasible(
                f"Expert {expert!r} is predicted to need ~{t:.0f} ms and ~{j:.3g} J (modelled) "
                f"for {shape.output_tokens} output tokens, over this request's budgets "
                f"(latency_ms={budget.latency_ms}, energy_j={budget.energy_j}). Raise the "
                f"budget, lower max_tokens, use model 'auto', or send best_effort=true.",
                LATENCY_FIELD if late else ENERGY_FIELD,
            )
        return not (late or costly)

    async def _generate(
        self, request: GenerationRequest, ctx: RouteContext
    ) -> AsyncIterator[GenerationChunk]:
        start = time.perf_counter()
        try:
            report, order = await self._plan(request, ctx)
        except BudgetInfeasible as exc:
            if self.metrics is not None:
                self.metrics.infeasible.labels(param=exc.param or "").inc()
            raise
        if report.aggregation == TOKEN_MIXTURE:
            stream = self._mixed(request, order, report, start, ctx.stream)
        elif ctx.stream:
            stream = self._stream(request, order, report, start)
        else:
            stream = self._vote(request, order, report, start)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def _stream(
        self, request: GenerationRequest, order: list[str], report: RouteReport, start: float
    ) -> AsyncIterator[GenerationChunk]:
        for i, expert in enumerate(order):
            report.experts = [expert]
            t0 = time.perf_counter()
            it = self.experts[expert].generate(request)
            try:
                first = await anext(it, None)
            except ValueError:
                await it.aclose()
                raise
            except Exception as exc:
                await it.aclose()
                self._failed(report, expert, exc)
                if i == len(order) - 1:
                    raise _unavailable(report) from exc
                continue
            async with contextlib.aclosing(it):
                chunk = first
                while chunk is not None:
                    if chunk.finish_reason is not None:  # one expert ran: its energy, its time
                        actual = Shape(chunk.prompt_tokens, chunk.completion_tokens)
                        energy = self.predictor.energy_of(expert, actual, chunk.report)
                        report.set_energy({expert: energy})
                        self.predictor.observe(expert, actual, time.perf_counter() - t0)
                        self._finish(report, expert, start)
                        chunk = replace(chunk, report=report.usage())
                    yield chunk
                    chunk = await anext(it, None)
            return

    async def _mixed(
        self,
        request: GenerationRequest,
        order: list[str],
        report: RouteReport,
        start: float,
        stream: bool,
    ) -> AsyncIterator[GenerationChunk]:
        """The top k mixed token by token (`token_mixture`); an expert that dies is dropped
        and the rest carry on. If no stream opens (e.g. edges without the Mix RPC), the
        request is served as without mixing."""
        assert self.mixer is not None
        chosen = list(report.experts)
        weights = {e: report.weights[e] for e in chosen}
        streams = {e: self.mixer.open(self.experts[e], request) for e in chosen}
        t0 = time.perf_counter()
        chunks: list[GenerationChunk] = []
        it = mix_generate(streams, weights, request.params, report=report)
        try:
            async with contextlib.aclosing(it):
                async for chunk in it:
                    if chunk.finish_reason is not None:
                        actual = Shape(chunk.prompt_tokens, chunk.completion_tokens)
                        # Every expert that ran processed the sequence (or part of it).
                        report.energy_j = sum(self.predictor.energy_j(e, actual) for e in chosen)
                        for e in chosen:
                            if e not in report.failed:
                                self.predictor.observe(e, actual, time.perf_counter() - t0)
                        self._finish(report, report.answered_by or chosen[0], start)
                        chunk = replace(chunk, report=report.usage())
                    if stream:
                        yield chunk
                    else:
                        chunks.append(chunk)
        except ConnectionError:
            if chunks or report.answered_by is not None:
                raise
            # Nothing reached the client: serve it the ordinary way.
            report.failed.clear()
            report.aggregation = RULE if report.top_k > 1 and not stream else "single"
            fallback = self._stream if stream else self._vote
            async with contextlib.aclosing(fallback(request, order, report, start)) as again:
                async for chunk in again:
                    yield chunk
            return
        if not stream and chunks:
            yield replace(_merge(chunks), report=chunks[-1].report)

    async def _vote(
        self, request: GenerationRequest, order: list[str], report: RouteReport, start: float
    ) -> AsyncIterator[GenerationChunk]:
        k = report.top_k
        weights = report.weights
        pending = list(order)
        results: dict[str, list[GenerationChunk]] = {}
        tasks: dict[asyncio.Task, str] = {}
        ran: list[str] = []

        def launch() -> None:
            while pending and len(tasks) + len(results) < k:
                expert = pending.pop(0)
                ran.append(expert)
                tasks[asyncio.create_task(self._collect(expert, request))] = expert

        pick = self.picks.get(report.experts) if report.aggregation == SELF_SCORE else None
        if k == 1:  # one expert at a time, in this task (no task and wait per request)
            for expert in pending:
                ran.append(expert)
                try:
                    results[expert] = await self._collect(expert, request)
                    break
                except ValueError:
                    raise
                except Exception as exc:
                    self._failed(report, expert, exc)
            pending = []
        # Tasks copy the context when created: every expert launched below scores the prompt.
        scoring = score_prompt.set(pick is not None)
        try:
            launch()
            while tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    expert = tasks.pop(task)
                    exc = task.exception()
                    if exc is None:
                        results[expert] = task.result()
                    elif isinstance(exc, ValueError):
                        raise exc
                    else:
                        self._failed(report, expert, exc)
                launch()
        finally:
            score_prompt.reset(scoring)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        report.experts = ran
        if not results:
            raise _unavailable(report)
        answers = [
            Answer(e, weights.get(e, 0.0), "".join(c.text for c in results[e]))
            for e in order
            if e in results
        ]
        winner = None
        if pick is not None:
            scores = {e: _prompt_score(results.get(e)) for e in pick.experts}
            winner = pick.choose(scores, len(gate_text(request)))
        if winner not in results:  # no pick, or its expert did not answer: the vote
            winner = weighted_vote(answers).expert_id
        # Energy of every expert that answered, for its actual tokens: measured where its
        # usage reports measured joules, else modelled (an expert that failed half-way is
        # not charged: its work is unknown).
        report.set_energy(
            {
                e: self.predictor.energy_of(e, _shape_of(cs), cs[-1].report)
                for e, cs in results.items()
            }
        )
        self._finish(report, winner, start)
        yield replace(_merge(results[winner]), report=report.usage())

    async def _collect(
        self, expert: str, request: GenerationRequest, attempts: int = 2
    ) -> list[GenerationChunk]:
        """The expert's whole answer. Nothing has reached the client yet, so an answer that
        breaks off half-way (its replica died) is asked for again, once, from the expert's
        other replicas; the client's own mistakes (ValueError) are not retried."""
        token = whole_answer.set(True)  # nothing streams: the expert may answer in one piece
        try:
            return await self._collect_once(expert, request, attempts)
        finally:
            whole_answer.reset(token)

    async def _collect_once(
        self, expert: str, request: GenerationRequest, attempts: int
    ) -> list[GenerationChunk]:
        for attempt in range(attempts):
            t0 = time.perf_counter()
            chunks: list[GenerationChunk] = []
            it = self.experts[expert].generate(request)
            try:
                async with contextlib.aclosing(it):
                    async for chunk in it:
                        chunks.append(chunk)
            except ValueError:
                raise
            except Exception:
                if attempt + 1 == attempts:
                    raise
                continue
            if chunks:
                self.predictor.observe(expert, _shape_of(chunks), time.perf_counter() - t0)
            return chunks
        raise AssertionError("unreachable")

    # -- bookkeeping ---------------------------------------------------------------------

    def _failed(self, report: RouteReport, expert: str, exc: BaseException) -> None:
        report.failed.append(expert)
        if self.metrics is not None:
            self.metrics.expert_failures.labels(expert=expert).inc()

    def _finish(self, report: RouteReport, expert: str, start: float) -> None:
        report.answered_by = expert
        report.latency_ms = (time.perf_counter() - start) * 1e3
        if self.metrics is not None:
            self.metrics.observe(report)


def _unavailable(report: RouteReport) -> ExpertUnavailable:
    return ExpertUnavailable(
        f"every expert tried failed ({', '.join(report.failed)}); retry shortly"
    )


def _prompt_score(chunks: Sequence[GenerationChunk] | None) -> PromptScore | None:
    """The expert's score of the prompt, from its last chunk (None: it sent none)."""
    report = chunks[-1].report if chunks else None
    score = (report or {}).get("prompt_score")
    return None if score is None else PromptScore(**score)


def _shape_of(chunks: Sequence[GenerationChunk]) -> Shape:
    last = chunks[-1]
    return Shape(last.prompt_tokens, last.completion_tokens)


def _merge(chunks: Sequence[GenerationChunk]) -> GenerationChunk:
    """One chunk holding a whole collected answer."""
    last = chunks[-1]
    return GenerationChunk(
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        exit_layers=tuple(x for c in chunks for x in c.exit_layers),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason or "stop",
        sources=tuple(s for c in chunks for s in c.sources),
    )
