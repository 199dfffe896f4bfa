"""`make bench-collab`: the CE-CoLLM comparison on this machine, all modes in one run.

Four modes on the same prompts (greedy, `ignore_eos`, T new tokens each):

1. cloud-only: the edge sends text; a separate full-model server
   (`python -m services.edge_node.main`, tau 1.0) generates; driven by `EdgeClient`, the
   request and the streamed reply cross an emulated link.
2. naive cloud-edge: the edge runs layers [0, split) with exit heads; every cloud token
   request carries the whole context's split-layer states (`CloudLinkConfig(context="full")`).
3. CE-CoLLM collaborative: asynchronous incremental uploads, one-row token requests.
4. edge standalone: the split decoder without a cloud; unconfident tokens come from the
   split head.
5. speculative (lossless): confident split-head tokens are drafts the cloud checks as the
   uploads arrive (`EngineConfig(collab="speculative")`); output equals cloud-only.

The cloud context manager runs as a separate process (`python -m services.cloud_ctx.main
--no-redis`). Edge clients are `EdgeEngine`s in this process sharing one loaded model, each
with its own `CloudLink` and emulated link. The bench process is pinned to core 0, both
servers to core 1, one torch thread each; the cloud's speed advantage is emulated by slowing
the edge (`EngineConfig.slowdown`). Quality: greedy agreement with cloud-only, and
teacher-forced bits per character with the distribution each mode would use.

Writes docs/bench/collab.{md,json,png}; `--render-only` rewrites md/png from the json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.collab_quality import StreamScorer
from bench.collab_report import Run, agreement, cloud_layer_rows, find, headline, plot, render
from bench.edge import OUT
from bench.machine import cpu_name
from services.edge_node.cloud_link import CloudLink, CloudLinkConfig
from services.edge_node.engine import EdgeEngine, EngineConfig
from services.edge_node.grpc_server import chunk_to_proto
from services.edge_node.tau_policy import TauPolicy
from tandem.clients.edge import EdgeClient, build_generate_request
from tandem.data.corpus import TextSample, load_corpus
from tandem.launch import ServiceProcess, free_port
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.engine_api import ChatMessage, GenerationRequest
from tandem.runtime.exit_head import decide
from tandem.runtime.sampling import SamplingParams
from tandem.transport.hidden import decode_hidden, encode_hidden
from tandem.transport.network import EmulatedLink, LinkProfile

SNIPPET_CHARS = 240  # corpus text per prompt
BPC_MAX_TOKENS = 256
READY_TIMEOUT_S = 600.0


# ---- prompts --------------------------------------------------------------------------------


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    nl = cut.rfind("\n")
    return cut[:nl] if nl > limit // 2 else cut


def instruction(sample: TextSample) -> str:
    """An Alpaca-like instruction built from one corpus text."""
    text = _snippet(sample.text)
    if sample.source == "wordnet":
        word, _, gloss = text.partition(":")
        return (
            f"Write a short paragraph that uses the word '{word.strip()}' "
            f"(meaning: {gloss.strip()})."
        )
    if sample.source == "stdlib":
        return f"Explain what this Python code does:\n\n```python\n{text}\n```"
    return f"Explain the meaning of this quotation in a few sentences:\n\n{text}"


def build_prompts(n: int) -> list[list[ChatMessage]]:
    samples = load_corpus("test", math.ceil(n / 3))[:n]
    return [[ChatMessage("user", instruction(s))] for s in samples]


# ---- processes ------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process and the gRPC target it answers on."""

    proc: ServiceProcess
    target: str

    def check(self) -> None:
        self.proc.check()

    def stop(self) -> None:
        self.proc.stop(grace_s=30)


def start_server(
    name: str, args: list[str], port: int, cores: set[int] | None, log_dir: Path
) -> Server:
    # No inherited TANDEM_* settings (TANDEM_SPLIT would turn the cloud-only server into
    # a split edge, TANDEM_REDIS_URL would give the cloud a log); the flags say it all.
    env = {"TANDEM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = ServiceProcess.start(name, args, log_dir, env, cores=cores)
    return Server(proc, f"127.0.0.1:{port}")


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> None:
    server.proc.wait_grpc(server.target, timeout=timeout)


@contextlib.contextmanager
def servers(
    model: str, split: int, quant: str, pinned: bool, log_dir: Path
) -> Iterator[tuple[Server, Server]]:
    cores = {1} if pinned else None
    cloud_port, full_port = free_port(), free_port()
    cloud = start_server(
        "cloud_ctx",
        [
            "services.cloud_ctx.main",
            f"--model={model}",
            f"--split={split}",
            f"--quant={quant}",
            f"--grpc-port={cloud_port}",
            "--metrics-port=0",
            "--no-redis",
        ],
        cloud_port,
        cores,
        log_dir,
    )
    full = start_server(
        "cloud_only",
        [
            "services.edge_node.main",
            f"--model={model}",
            f"--quant={quant}",
            "--tau=1.0",
            # eager like cloud_ctx and the edge engines here: the modes differ in what they
            # compute, not in how (cloud_ctx has no compiled path yet)
            "--no-compile",
            f"--port={free_port()}",
            f"--grpc-port={full_port}",
        ],
        full_port,
        cores,
        log_dir,
    )
    try:
        yield cloud, full
    finally:
        cloud.stop()
        full.stop()


# ---- one run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    lm: LoadedModel
    split: int
    prompts: list[list[ChatMessage]]
    prompt_ids: list[tuple[int, ...]]
    params: SamplingParams
    cloud_speed: float
    timeout_s: float
    cloud_target: str
    full_target: str


def _order(n_prompts: int, client: int) -> list[int]:
    """Client k starts at prompt k so concurrent clients are not in lockstep."""
    return [(client + i) % n_prompts for i in range(n_prompts)]


def run_engines(
    s: Setup, mode: str, link: str | None, tau: float, clients: int, encoding: str = "fp16"
) -> Run:
    """naive, ce-collm, speculative or standalone with `clients` EdgeEngines here."""
    model = s.lm.model
    engines: list[EdgeEngine] = []
    links: list[CloudLink] = []
    stamp = f"{mode}-{time.monotonic_ns()}"
    for k in range(clients):
        cloud = None
        if mode != "standalone":
            cloud = CloudLink(
                CloudLinkConfig(
                    target=s.cloud_target,
                    encoding=encoding,
                    timeout_s=s.timeout_s,
                    context="full" if mode == "naive" else "incremental",
                    link=LinkProfile.parse(link) if link else None,
                    client_id=f"{stamp}-{k}",
                )
            )
            cloud.start()
            links.append(cloud)
        speculative = mode == "speculative"
        engine = EdgeEngine(
            s.lm.spec.id,
            s.lm.decoder(depth=s.split, split_only=speculative),
            s.lm.codec,
            EngineConfig(
                max_batch=1,
                tau=tau,
                slowdown=s.cloud_speed,
                collab="speculative" if speculative else "final",
            ),
            cloud=cloud,
            tau_policy=TauPolicy(tau, tau),  # fixed tau: no latency-aware lowering
        )
        engine.start()
        engines.append(engine)

    async def client(k: int) -> tuple[float, list, list[float]]:
        engine, link = engines[k], links[k] if links else None

        def snap() -> tuple[float, ...]:
            c = link.counters if link is not None else None
            return (
                time.perf_counter(),
                engine.stats.model_s,
                c.cloud_s if c else 0.0,
                c.round_trip_s - c.cloud_s if c else 0.0,
            )

        done = []
        phases = [0.0] * 5  # ttft, decode wall, edge, cloud, comm
        t0 = time.perf_counter()
        for i in _order(len(s.prompt_ids), k):
            req = GenerationRequest(f"c{k}-p{i}", s.prompt_ids[i], s.params)
            ids, sources, exits = [], [], []
            t_req, first = time.perf_counter(), None
            async for c in engine.generate(req):
                if first is None:
                    first = snap()
                ids.extend(c.token_ids)
                sources.extend(c.sources)
                exits.extend(c.exit_layers)
            end = snap()
            phases[0] += first[0] - t_req
            for j in range(4):
                phases[1 + j] += end[j] - first[j]
            done.append((i, ids, sources, exits))
        return time.perf_counter() - t0, done, phases

    async def all_clients():
        return await asyncio.gather(*(client(k) for k in range(clients)))

    try:
        results = asyncio.run(all_clients())
    finally:
        for e in engines:
            e.stop()
        for c in links:
            c.close()
    run = Run(mode, link, tau, clients, encoding)
    n_layers = model.cfg.n_layers
    for k, (wall, done, phases) in enumerate(results):
        run.total_s += wall
        run.edge_s += engines[k].stats.model_s
        run.ttft_s += phases[0]
        run.dec_s, run.dec_edge_s = run.dec_s + phases[1], run.dec_edge_s + phases[2]
        run.dec_cloud_s, run.dec_comm_s = run.dec_cloud_s + phases[3], run.dec_comm_s + phases[4]
        outs: list[list[int]] = [[] for _ in s.prompt_ids]
        for i, ids, sources, exits in done:
            outs[i] = ids
            run.tokens += len(ids)
            run.cloud_tokens += sources.count("cloud")
            run.dec_tokens += len(ids) - 1
            run.dec_cloud_tokens += sources[1:].count("cloud")
            run.fallback_tokens += sources.count("fallback")
            for src, layer in zip(sources, exits, strict=True):
                if src != "cloud":
                    run.exit_tokens[str(layer)] = run.exit_tokens.get(str(layer), 0) + 1
            run.cloud_layer_rows += cloud_layer_rows(
                mode, len(s.prompt_ids[i]), sources, n_layers, s.split
            )
        run.outputs.append(outs)
    for c in links:
        run.cloud_s += c.counters.cloud_s
        run.comm_s += c.counters.round_trip_s - c.counters.cloud_s
        run.bytes_up += c.counters.bytes_up
        run.bytes_down += c.counters.bytes_down
        run.token_requests += c.counters.token_requests
        run.positions_sent += c.counters.positions_sent
        run.drafts += c.counters.drafts_sent
        run.rollbacks += c.counters.rollbacks
    return _per_client(run, clients)


def _per_client(run: Run, clients: int) -> Run:
    for name in (
        "total_s",
        "edge_s",
        "cloud_s",
        "comm_s",
        "bytes_up",
        "bytes_down",
        "ttft_s",
        "drafts",
        "rollbacks",
    ):
        setattr(run, name, getattr(run, name) / clients)
    for name in ("dec_s", "dec_edge_s", "dec_cloud_s", "dec_comm_s"):
        setattr(run, name, getattr(run, name) / clients)
    for name in ("cloud_layer_rows", "positions_sent"):
        setattr(run, name, getattr(run, name) / clients)
    for name in ("tokens", "cloud_tokens", "fallback_tokens", "token_requests"):
        setattr(run, name, getattr(run, name) // clients)
    for name in ("dec_tokens", "dec_cloud_tokens"):
        setattr(run, name, getattr(run, name) // clients)
    run.exit_tokens = {k: v // clients for k, v in run.exit_tokens.items()}
    return run


def run_cloud_only(s: Setup, link: str, clients: int) -> Run:
    """The edge sends the chat messages as text to the full-model server; the request and
    every streamed reply chunk cross the emulated link (the chunks pipelined: each one is
    scheduled on the down link when it arrives on loopback)."""
    profile = LinkProfile.parse(link)
    n_layers = s.lm.model.cfg.n_layers

    async def client(k: int):
        emu = EmulatedLink(profile)

        async def down(nbytes: int) -> float:
            await emu.send(nbytes, "down")
            return time.perf_counter()

        wall = cloud = ttft = dec_cloud = 0.0
        outs: list[list[int]] = [[] for _ in s.prompts]
        async with EdgeClient(s.full_target) as ec:
            for i in _order(len(s.prompts), k):
                t0 = time.perf_counter()
                req = build_generate_request(messages=s.prompts[i], params=s.params)
                await emu.send(req.ByteSize(), "up")
                t_call = time.perf_counter()
                downs, loopback = [], []
                async for c in ec.generate(messages=s.prompts[i], params=s.params):
                    loopback.append(time.perf_counter())
                    outs[i].extend(c.token_ids)
                    downs.append(asyncio.create_task(down(chunk_to_proto(c).ByteSize())))
                cloud += loopback[-1] - t_call
                dec_cloud += loopback[-1] - loopback[0]
                arrivals = await asyncio.gather(*downs)
                ttft += arrivals[0] - t0
                wall += max(arrivals) - t0
        return wall, cloud, ttft, dec_cloud, emu.stats, outs

    async def all_clients():
        return await asyncio.gather(*(client(k) for k in range(clients)))

    run = Run("cloud-only", link, None, clients)
    for wall, cloud, ttft, dec_cloud, stats, outs in asyncio.run(all_clients()):
        run.total_s += wall
        run.cloud_s += cloud
        run.comm_s += wall - cloud
        run.ttft_s += ttft
        run.dec_s += wall - ttft
        run.dec_cloud_s += dec_cloud
        run.dec_comm_s += wall - ttft - dec_cloud
        run.bytes_up += stats.bytes_up
        run.bytes_down += stats.bytes_down
        for i, ids in enumerate(outs):
            run.tokens += len(ids)
            run.cloud_tokens += len(ids)
            run.dec_tokens += len(ids) - 1
            run.dec_cloud_tokens += len(ids) - 1
            run.cloud_layer_rows += cloud_layer_rows(
                "cloud-only", len(s.prompt_ids[i]), ["cloud"] * len(ids), n_layers, s.split
            )
        run.outputs.append(outs)
    return _per_client(run, clients)


# ---- quality ------------------------------------------------------------------------------
# Per run: the full model's bits/char on the stream the run served (bench.collab_quality).
# On corpus text, teacher-forced, the parts that have an honest per-position answer: the
# full model's bits/char with the split states as the cloud receives them, and how many
# positions the edge's exits answer and how often they equal the full model's argmax.


@torch.inference_mode()
def corpus_teacher_forced(
    lm: LoadedModel, split: int, texts: Sequence[str], taus: Sequence[float]
) -> dict[str, float | int]:
    """Teacher-forced on `texts`: bits/char of the full model when its upper layers read
    the split states as transported ("cloud-only" = bf16, "fp16", "int8" round trip), and
    per tau the fraction of positions a confident edge exit answers (the exits below the
    split first, then the split head: "exited <tau>") with the fraction of those whose
    token is the full model's argmax ("exit agreement <tau>"). An exit's token is a hard
    decision, so it gets no bits/char here; runs are scored on their served streams."""
    model = lm.model
    n_layers = model.cfg.n_layers
    heads = sorted((h for h in lm.heads if h.cfg.layer <= split), key=lambda h: h.cfg.layer)
    bounds = [0, *[h.cfg.layer for h in heads]]
    if bounds[-1] != split:
        bounds.append(split)
    nll: dict[str, float] = {}
    exited: dict[str, int] = {}
    agreed: dict[str, int] = {}
    chars = tokens = 0
    for text in texts:
        ids = lm.codec.encode(text)[:BPC_MAX_TOKENS]
        if len(ids) < 2:
            continue
        targets = torch.tensor(ids[1:])
        kv = model.new_kv()
        h = model.embed(torch.tensor(ids))
        decisions = []
        for i in range(len(bounds) - 1):
            h = model.run_sequence(h, kv, 0, bounds[i], bounds[i + 1])
            head = next((x for x in heads if x.cfg.layer == bounds[i + 1]), None)
            if head is not None:
                decisions.append((head, head(h[:-1])))
        argmax = None
        for name in ("bf16", "fp16", "int8"):
            hs = h if name == "bf16" else decode_hidden(encode_hidden(h, name), h.dtype)
            top = model.run_sequence(hs, model.new_kv(first_layer=split), 0, split, n_layers)
            final = torch.log_softmax(model.logits(top[:-1]).float(), dim=-1)
            key = "cloud-only" if name == "bf16" else name
            nll[key] = nll.get(key, 0.0) - float(final.gather(1, targets[:, None]).sum())
            if argmax is None:
                argmax = final.argmax(-1)
        for tau in taus:
            t = f"{tau:g}"
            decided = torch.zeros(len(ids) - 1, dtype=torch.bool)
            good = torch.zeros_like(decided)
            if tau < 1.0:
                for head, logits in decisions:
                    d = decide(logits, head.shortlist, tau)
                    take = d.confident & ~decided
                    good |= take & (d.token == argmax)
                    decided |= take
            exited[t] = exited.get(t, 0) + int(decided.sum())
            agreed[t] = agreed.get(t, 0) + int(good.sum())
        chars += len(lm.codec.decode(ids[1:]))
        tokens += len(ids) - 1
    out: dict[str, float | int] = {k: v / chars / math.log(2) for k, v in nll.items()}
    for t, n in exited.items():
        out[f"exited {t}"] = n / tokens
        out[f"cloud rate {t}"] = 1 - n / tokens
        out[f"exit agreement {t}"] = agreed[t] / n if n else None
    out["texts"], out["tokens"], out["chars"] = len(texts), tokens, chars
    return out


# ---- plan, main -----------------------------------------------------------------------------


def plan(
    links: list[str],
    taus: list[float],
    clients: list[int],
    tau0: float,
    int8: bool,
    naive_links: list[str],
    spec_taus: Sequence[float] = (),
) -> list[tuple]:
    """(mode, link, tau, clients, encoding) in run order."""
    out: list[tuple] = []
    for link in links:
        out.append(("cloud-only", link, None, 1, "fp16"))
        out += [("ce-collm", link, t, 1, "fp16") for t in taus]
        if link == links[0]:
            out += [("speculative", link, t, 1, "fp16") for t in spec_taus]
        if link in naive_links:
            out.append(("naive", link, tau0, 1, "fp16"))
    if int8:
        out.append(("ce-collm", links[0], tau0, 1, "int8"))
    out += [("standalone", None, t, 1, "fp16") for t in taus]
    for n in clients:
        if n > 1:
            out.append(("cloud-only", links[0], None, n, "fp16"))
            out.append(("ce-collm", links[0], tau0, n, "fp16"))
    return out


def _warm_up(s: Setup) -> None:
    """Untimed: first calls into both servers and the edge kernels."""
    short = replace(
        s,
        params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        prompt_ids=s.prompt_ids[:1],
        prompts=s.prompts[:1],
    )
    run_cloud_only(short, "1000mbit/0ms", 1)
    run_engines(short, "ce-collm", None, 1.0, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen15")
    p.add_argument("--split", type=int, help="default: the model's middle exit layer")
    p.add_argument("--quant", help="default: the model's serving default")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--links", default="10mbit/20ms,100mbit/5ms")
    p.add_argument("--taus", default="0.6,0.8,0.9,1.0")
    p.add_argument("--tau-main", type=float, default=0.8, help="tau of naive/int8/clients rows")
    p.add_argument(
        "--spec-taus",
        default="0.0,0.6,0.8,0.9",
        help="taus of the speculative (lossless) rows, on the first link; '' for none",
    )
    p.add_argument("--clients", default="1,2,4")
    p.add_argument(
        "--naive-links",
        help="links with a naive row (default: the first; one naive run costs minutes)",
    )
    p.add_argument("--cloud-speed", type=float, default=1.1, help="cloud speed / edge speed")
    p.add_argument("--timeout", type=float, default=60.0, help="cloud token timeout (s)")
    p.add_argument("--bpc-texts", type=int, default=6, help="test texts per corpus source")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sweep")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--render-only", action="store_true", help="rewrite md/png from the json")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.render_only:
        write_reports(json.loads((out / "collab.json").read_text()), out)
        return
    if a.quick:
        a.prompts, a.max_tokens, a.bpc_texts = 2, 8, 1
        a.taus, a.clients, a.spec_taus = "0.8,1.0", "1,2", "0.0,0.8"
    links = a.links.split(",")
    taus = [float(t) for t in a.taus.split(",")]
    clients = [int(c) for c in a.clients.split(",")]
    spec_taus = [float(t) for t in a.spec_taus.split(",") if t]
    tau0 = a.tau_main if a.tau_main in taus else taus[0]
    for link in links:
        LinkProfile.parse(link)
    t_start = time.perf_counter()
    spec = ModelRegistry().get(a.model)
    quant = a.quant or spec.default_quant
    split = a.split or spec.exit_layers[len(spec.exit_layers) // 2]
    pinned = not a.no_pin and len(os.sched_getaffinity(0)) >= 2
    if pinned:
        os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-collab-"))
    _log(t_start, f"server logs in {log_dir}")
    load0 = os.getloadavg()
    with servers(a.model, split, quant, pinned, log_dir) as (cloud, full):
        lm = load_model(spec, LoadOptions(quant=quant, exits=True))
        prompts = build_prompts(a.prompts)
        s = Setup(
            lm=lm,
            split=split,
            prompts=prompts,
            prompt_ids=[tuple(lm.codec.encode_chat(m)) for m in prompts],
            params=SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True),
            cloud_speed=a.cloud_speed,
            timeout_s=a.timeout,
            cloud_target=cloud.target,
            full_target=full.target,
        )
        wait_ready(cloud)
        wait_ready(full)
        _log(t_start, "servers ready; warming up")
        _warm_up(s)
        runs: list[Run] = []
        naive_links = a.naive_links.split(",") if a.naive_links else links[:1]
        runs_plan = plan(links, taus, clients, tau0, not a.no_int8, naive_links, spec_taus)
        for mode, link, tau, n, enc in runs_plan:
            t = time.perf_counter()
            if mode == "cloud-only":
                r = run_cloud_only(s, link, n)
            else:
                r = run_engines(s, mode, link, tau, n, enc)
            runs.append(r)
            _log(
                t_start,
                f"{r.key}: total {r.total_s:.2f} s, cloud {r.cloud_s:.2f}, edge {r.edge_s:.2f}, "
                f"comm {r.comm_s:.2f}, {r.bytes_total / 1e3:.1f} KB, cloud rate "
                f"{r.cloud_rate:.0%}, fallback {r.fallback_tokens} "
                f"({time.perf_counter() - t:.0f} s)",
            )
        cloud.check()
        full.check()
    load1 = os.getloadavg()
    if pinned:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    torch.set_num_threads(os.cpu_count() or 1)
    _log(t_start, "quality: served streams, corpus teacher-forced")
    texts = [x.text for x in load_corpus("test", a.bpc_texts)]
    bpc = corpus_teacher_forced(lm, split, texts, taus)
    scorer = StreamScorer(lm.model, lm.codec.decode)
    ref = find(runs, mode="cloud-only", clients=1)
    for r in runs:
        refs = [o for _ in r.outputs for o in ref.outputs[0]] if ref else []
        if refs:
            ag = agreement([o for outs in r.outputs for o in outs], refs)
            r.agreement_pos, r.agreement_prefix, r.exact = ag["pos"], ag["prefix"], ag["exact"]
        r.bpc = scorer.bits_per_char(s.prompt_ids, r.outputs)
    cfg = lm.model.cfg
    data = {
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "command": " ".join(
            ["python -m bench.collab", *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": {
            "model": a.model,
            "upstream": spec.upstream,
            "quant": quant,
            "n_layers": cfg.n_layers,
            "hidden_size": cfg.hidden_size,
            "split": split,
            "edge_exits": [h.cfg.layer for h in lm.heads if h.cfg.layer <= split],
            "prompts": a.prompts,
            "prompt_tokens_min": min(len(x) for x in s.prompt_ids),
            "prompt_tokens_max": max(len(x) for x in s.prompt_ids),
            "max_tokens": a.max_tokens,
            "links": links,
            "taus": taus,
            "tau_main": tau0,
            "spec_taus": spec_taus,
            "clients": clients,
            "clients_link": links[0],
            "cloud_speed": a.cloud_speed,
            "timeout_s": a.timeout,
            "pinned": pinned,
            "quick": a.quick,
        },
        "timing": {
            "wall_s": time.perf_counter() - t_start,
            "loadavg_start": load0,
            "loadavg_end": load1,
        },
        "bpc": bpc,
        "runs": [asdict(r) for r in runs],
    }
    write_reports(data, out)
    print_ratios(data)


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def print_ratios(data: dict) -> None:
    runs = [Run(**r) for r in data["runs"]]
    tau0 = data["config"]["tau_main"]
    for link in data["config"]["links"]:
        ref = find(runs, mode="cloud-only", link=link, clients=1)
        print(f"\n{link}, tau {tau0:g} (ratios against cloud-only in this run):")
        for r in runs:
            if r.clients != 1 or r.tau not in (None, tau0) or r.link not in (None, link):
                continue
            if ref is None:
                continue
            print(
                f"  {r.mode:11s} {r.encoding}: time {r.total_s / ref.total_s:5.2f}×  "
                f"cloud {r.cloud_s / ref.cloud_s:5.2f}×  bytes "
                f"{r.bytes_total / ref.bytes_total:8.2f}×  cloud rate {r.cloud_rate:.0%}  "
                f"agreement {r.agreement_pos or 0:.0%}  bpc {r.bpc or float('nan'):.3f}"
            )
        h = headline(runs, link, tau0)
        print(
            "  headline: "
            + ", ".join(f"{k} {v:.1%}" if v is not None else f"{k} —" for k, v in h.items())
        )


def _numeric(x) -> bool:
    if isinstance(x, list):
        return all(_numeric(y) for y in x)
    return isinstance(x, int | float) and not isinstance(x, bool)


def dumps(data, indent: int = 0) -> str:
    """Indented JSON with every (nested) list of numbers on one line (token ids stay compact)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(data, dict) and data:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(data, list) and data and not _numeric(data):
        items = [f"{inner}{dumps(v, indent + 1)}" for v in data]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(data)


def write_reports(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "collab.json").write_text(dumps(data) + "\n")
    md = render(data)
    (out / "collab.md").write_text(md)
    plot(data, out / "collab.png")
    print(md)


if __name__ == "__main__":
    main()
