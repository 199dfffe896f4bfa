"""Pure helpers of `make bench-collab`: per-run metrics, the markdown report and the plot.

Nothing here touches a model or a network, so `--render-only` and the tests use it alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# CE-CoLLM (arXiv 2411.02829), Alpaca, 100 samples (shared/research/papers.md 2.4).
PAPER = {
    "time_s": {"cloud-only": 370.17, "naive": 3371.76, "standalone": 201.57, "ce-collm": 319.06},
    "cloud_s": {"cloud-only": 369.80, "naive": 253.36, "standalone": 0.0, "ce-collm": 112.72},
    "edge_s": {"cloud-only": 0.0, "naive": 241.43, "standalone": 201.57, "ce-collm": 192.20},
    "comm_s": {"cloud-only": 0.37, "naive": 2876.98, "standalone": 0.0, "ce-collm": 14.13},
    "kb": {"naive": 112128.0, "ce-collm": 956.62},
    "time_reduction": 0.1381,  # 1 - 319.06 / 370.17
    "bytes_reduction": 0.9915,  # vs naive
    "offload": 0.6952,  # 1 - 112.72 / 369.80 (Alpaca; XSum 84.53%)
    "cloud_rate": 0.4958,  # Alpaca, tau = 0.8 (XSum 27.73%)
}
MODE_LABEL = {
    "cloud-only": "cloud-only (edge sends text)",
    "naive": "naive cloud-edge (full context per request)",
    "ce-collm": "CE-CoLLM collaborative",
    "standalone": "CE-CoLLM edge standalone",
}


@dataclass
class Run:
    """One configuration, measured once. Times and bytes are per client (means over the
    clients of the run); token lists and sources are every client's, in prompt order."""

    mode: str  # cloud-only | naive | ce-collm | speculative | standalone
    link: str | None  # LinkProfile name, None for standalone
    tau: float | None  # None for cloud-only
    clients: int
    encoding: str = "fp16"
    total_s: float = 0.0  # wall time of a client's prompts, one after another
    edge_s: float = 0.0  # edge model time (EngineStats.model_s, emulated slowdown included)
    cloud_s: float = 0.0  # cloud model + queue time on the critical path
    comm_s: float = 0.0  # emulated link delay on the critical path
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    tokens: int = 0  # per client
    cloud_tokens: int = 0  # per client (answered by the cloud)
    fallback_tokens: int = 0  # per client (cloud too slow or down: the edge's own token)
    exit_tokens: dict[str, int] = field(default_factory=dict)  # exit layer -> tokens, per client
    cloud_layer_rows: float = 0.0  # per client: positions x layers the cloud computed
    token_requests: int = 0  # per client
    positions_sent: float = 0.0  # per client
    outputs: list[list[list[int]]] = field(default_factory=list)  # [client][prompt] token ids
    # time to the first token (prompt prefill + its round trip), summed over prompts
    ttft_s: float = 0.0
    # decode phase (after each prompt's first token): wall, edge, cloud, comm, tokens
    dec_s: float = 0.0
    dec_edge_s: float = 0.0
    dec_cloud_s: float = 0.0
    dec_comm_s: float = 0.0
    dec_tokens: int = 0
    dec_cloud_tokens: int = 0
    # speculative mode, per client: drafts sent for checking, and those rejected
    drafts: float = 0.0
    rollbacks: float = 0.0
    # filled after all runs
    agreement_pos: float | None = None
    agreement_prefix: float | None = None
    exact: float | None = None
    bpc: float | None = None

    @property
    def other_s(self) -> float:
        return self.total_s - self.edge_s - self.cloud_s - self.comm_s

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down

    @property
    def cloud_rate(self) -> float:
        return self.cloud_tokens / self.tokens if self.tokens else 0.0

    @property
    def key(self) -> str:
        parts = [self.mode, self.link or "-", "-" if self.tau is None else f"{self.tau:g}"]
        return "/".join([*parts, f"{self.clients}c", self.encoding])


def cloud_layer_rows(
    mode: str, prompt_len: int, sources: Sequence[str], n_layers: int, split: int
) -> int:
    """Positions x layers the cloud computes for one sequence of len(sources) new tokens.

    cloud-only: the full model over every position that produced a token (the prompt, then
    each new token but the last). CE-CoLLM: its context manager catches up lazily, so it
    computes layers [split, L) for every position up to the last one it was asked about
    (positions after that are uploaded but never run). Naive: every request starts a fresh
    session holding the whole context, so each one recomputes it.
    Token j (0-based) comes from position prompt_len - 1 + j.
    """
    if mode == "cloud-only":
        return (prompt_len + len(sources) - 1) * n_layers
    asked = [j for j, s in enumerate(sources) if s == "cloud"]
    upper = n_layers - split
    if mode == "naive":
        return sum(prompt_len + j for j in asked) * upper
    if mode == "ce-collm":
        return (prompt_len + asked[-1]) * upper if asked else 0
    if mode == "speculative":  # every kept position (rows rolled back are not counted)
        return (prompt_len + len(sources) - 1) * upper
    return 0


def agreement(outs: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> dict:
    """Greedy agreement of outputs with the reference outputs of the same prompts:
    pos = fraction of positions holding the same token (to the end, after a divergence
    too); prefix = mean fraction of tokens before the first divergence; exact = fraction of
    identical sequences."""
    pos, prefix, exact, n = 0.0, 0.0, 0, 0
    for a, b in zip(outs, refs, strict=True):
        m = max(len(b), 1)
        pos += sum(x == y for x, y in zip(a, b, strict=False)) / m
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k / m
        exact += int(list(a) == list(b))
        n += 1
    n = max(n, 1)
    return {"pos": pos / n, "prefix": prefix / n, "exact": exact / n}


def find(runs: Sequence[Run], **want) -> Run | None:
    for r in runs:
        if all(getattr(r, k) == v for k, v in want.items()):
            return r
    return None


def find_mode(
    runs: Sequence[Run], mode: str, link: str, tau: float, encoding: str = "fp16"
) -> Run | None:
    """The one-client run of `mode` on `link` at `tau` (standalone has no link, cloud-only
    no tau)."""
    want = {} if mode == "cloud-only" else {"tau": tau}
    if mode != "standalone":
        want["link"] = link
    return find(runs, mode=mode, clients=1, encoding=encoding, **want)


# ---- markdown -----------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _pct(x: float | None) -> str:
    return _f(None if x is None else 100 * x, "{:.1f}%")


def _kb(n: float) -> str:
    return f"{n / 1e3:,.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def offload(run: Run, ref: Run | None) -> tuple[float | None, float | None]:
    """Fraction of the cloud-only deployment's cloud work that moved to the edge: by cloud
    time, and by cloud layer-rows (positions x layers)."""
    if ref is None or run.mode == "cloud-only":
        return None, None
    by_time = 1 - run.cloud_s / ref.cloud_s if ref.cloud_s else None
    by_rows = 1 - run.cloud_layer_rows / ref.cloud_layer_rows if ref.cloud_layer_rows else None
    return by_time, by_rows


def _mode_row(r: Run, ref: Run | None) -> list[object]:
    by_time, by_rows = offload(r, ref)
    label = MODE_LABEL[r.mode] + (" **int8**" if r.encoding == "int8" else "")
    return [
        label,
        _f(r.total_s),
        _f(r.cloud_s),
        _f(r.edge_s),
        _f(r.comm_s),
        _f(r.other_s),
        _kb(r.bytes_total),
        _pct(r.cloud_rate) if r.mode in ("naive", "ce-collm") else "—",
        _pct(by_time),
        _pct(by_rows),
        _pct(r.agreement_pos),
        _pct(r.agreement_prefix),
        _pct(r.exact),
        _f(r.bpc, "{:.3f}"),
    ]


MODE_HEADER = [
    "mode",
    "total s",
    "cloud s",
    "edge s",
    "comm s",
    "other s",
    "KB sent",
    "cloud request rate",
    "cloud work offloaded (time)",
    "(layer-rows)",
    "agreement (positions)",
    "(prefix)",
    "exact seqs",
    "bits/char (served stream)",
]


def headline(runs: Sequence[Run], link: str, tau: float) -> dict:
    """The paper's four headline figures, measured on one link at one tau (1 client)."""
    ref = find(runs, mode="cloud-only", link=link, clients=1)
    ce = find(runs, mode="ce-collm", link=link, tau=tau, clients=1, encoding="fp16")
    naive = find(runs, mode="naive", link=link, tau=tau, clients=1)
    out: dict[str, float | None] = {
        "time_reduction": None,
        "bytes_reduction": None,
        "offload": None,
        "offload_rows": None,
        "cloud_rate": None,
    }
    if ce is None:
        return out
    out["cloud_rate"] = ce.cloud_rate
    if ref is not None:
        out["time_reduction"] = 1 - ce.total_s / ref.total_s
        out["offload"], out["offload_rows"] = offload(ce, ref)
    if naive is not None and naive.bytes_total:
        out["bytes_reduction"] = 1 - ce.bytes_total / naive.bytes_total
    return out


def render(data: dict) -> str:
    cfg = data["config"]
    runs = [Run(**r) for r in data["runs"]]
    links, taus, tau0 = cfg["links"], cfg["taus"], cfg["tau_main"]
    bpc = data.get("bpc", {})
    lines = [
        "# Cloud-edge collaboration benchmark (`make bench-collab`)",
        "",
        "Reproduces the CE-CoLLM comparison (arXiv 2411.02829, Alpaca table, see "
        "shared/research/papers.md section 2.4) with Tandem's real edge engine, cloud link "
        "and cloud context manager. Generated by `python -m bench.collab`; raw numbers in "
        "[`collab.json`](collab.json), plot in [`collab.png`](collab.png).",
        "",
        "## Set-up (what is real, what is emulated)",
        "",
        f"- Machine: {data['machine']}. Run took {data['timing']['wall_s'] / 60:.1f} min "
        f"(`{data['command']}`).",
        f"- Model: `{cfg['model']}` ({cfg['upstream']}), {cfg['n_layers']} layers, "
        f"{cfg['quant']} weights everywhere (edge, cloud, cloud-only server); split after "
        f"layer {cfg['split']} (edge = layers [0, {cfg['split']}) + exit heads at "
        f"{', '.join(str(e) for e in cfg['edge_exits'])}; cloud = layers "
        f"[{cfg['split']}, {cfg['n_layers']}) + LM head). Hidden size {cfg['hidden_size']}: "
        f"{2 * cfg['hidden_size']} B per position in fp16.",
        f"- Workload: {cfg['prompts']} instruction prompts built from the corpus test split "
        "(fortunes: explain a quotation; wordnet: use a word in a paragraph; stdlib: explain "
        f"Python code), chat template, greedy, `ignore_eos`, {cfg['max_tokens']} new tokens "
        f"each (prompt lengths {cfg['prompt_tokens_min']}–{cfg['prompt_tokens_max']} "
        "tokens). Each client sends all prompts one after another; times are per client.",
        "- **Real:** the edge engine (`EdgeEngine`, split `ExitDecoder` with trained exit "
        "heads, deferred KV), the cloud context manager (`python -m services.cloud_ctx.main "
        "--no-redis`, separate process, gRPC on loopback), the cloud-only server "
        "(`python -m services.edge_node.main`, full model, separate process, driven by "
        "`EdgeClient`), the bytes on the wire (protobuf message sizes), all model compute.",
        "- **Emulated network:** every message is delayed in the application by "
        "`EmulatedLink` (FIFO pipe per direction: rtt/2 + bytes/bandwidth, queued behind "
        "earlier messages). For cloud-only the request goes up the same way and the streamed "
        "reply chunks come down through it (pipelined with generation).",
        f"- **Emulated cloud speed:** edge and cloud share one 2-core CPU, so the cloud is "
        f"made {cfg['cloud_speed']:g}× faster than the edge by slowing the edge: every edge "
        f"model step sleeps to take {cfg['cloud_speed']:g}× its measured time "
        "(`EngineConfig.slowdown`). "
        + (
            "The default 1.1 is the paper's own ratio: its standalone edge runs 16 of 32 "
            "layers in 201.57 s, its cloud 32 layers in 369.80 s, i.e. the edge needs "
            "(201.57/16)/(369.80/32) = 1.09× the cloud's time per layer."
            if abs(cfg["cloud_speed"] - 1.1) < 1e-9
            else ""
        ),
        "- **CPU sharing:** "
        + (
            "the bench process (all edge clients) is pinned to core 0 and both servers to "
            "core 1 (`sched_setaffinity`), every process with 1 torch thread, so edge and "
            "cloud each own one core. "
            if cfg["pinned"]
            else "not pinned (`--no-pin`); 1 torch thread per process. "
        )
        + "Several edge clients share the edge core, so their edge time grows with the "
        "number of clients (a real deployment has one device per client); the cloud-side "
        "numbers are the scaling signal.",
        f"- Fixed tau (latency-aware lowering off) for every row, so the sweep shows tau "
        f"itself; cloud token timeout {cfg['timeout_s']:g} s (fallback tokens would be "
        "listed).",
        "- *Bits/char (served stream)*: each run's output, scored by the full model "
        "(the cloud-only reference, same quantization) teacher-forced on prompt + output: "
        "-log2 p(token | prompt, the output's own prefix) summed over the served tokens, "
        "divided by the characters they decode to (`bench/collab_quality.py`). An exit "
        "head's token is a hard decision, not a distribution, so the stream the user got is "
        "what is scored; cloud-only greedy is the reference value, a wrong exit costs what "
        "the full model thinks of it there. Lower is better; read it beside agreement (a "
        "repetitive stream can also score low).",
        "- Columns: *cloud s* = the cloud's model + queue time reported per token request "
        "(cloud-only: request-to-last-chunk time on loopback); *comm s* = emulated delay on "
        "the critical path (token requests' round trip minus cloud time; cloud-only: total "
        "minus loopback time); *other s* = the rest (Python, gRPC, scheduling). *Offloaded* "
        "= 1 − cloud time / cloud-only cloud time, and 1 − cloud layer-rows / cloud-only "
        "layer-rows (positions × layers the cloud ran). *Agreement* with cloud-only's "
        "greedy tokens: same token at the same position, fraction before the first "
        "divergence, identical sequences.",
        "",
    ]
    for link in links:
        ref = find(runs, mode="cloud-only", link=link, clients=1)
        rows = [_mode_row(ref, ref)] if ref else []
        for mode, enc in (
            ("naive", "fp16"),
            ("standalone", "fp16"),
            ("ce-collm", "fp16"),
            ("ce-collm", "int8"),
        ):
            r = find_mode(runs, mode, link, tau0, enc)
            if r is not None:
                rows.append(_mode_row(r, ref))
        lines += [f"## Link {link}, tau = {tau0:g}, 1 client", ""]
        lines += _table(MODE_HEADER, rows)
        lines.append("")
    lines += decode_table(runs, links[0], tau0, cfg["prompts"])
    lines += ["## Against the paper", ""]
    rows = []
    for link in links:
        h = headline(runs, link, tau0)
        rows.append(
            [
                f"ours, {link}, tau {tau0:g}",
                _pct(h["time_reduction"]),
                _pct(h["bytes_reduction"]),
                f"{_pct(h['offload'])} ({_pct(h['offload_rows'])} layer-rows)",
                _pct(h["cloud_rate"]),
            ]
        )
    rows.append(
        [
            "paper (Alpaca, LLaMA-2-7B class, GPUs)",
            _pct(PAPER["time_reduction"]),
            _pct(PAPER["bytes_reduction"]),
            _pct(PAPER["offload"]),
            _pct(PAPER["cloud_rate"]),
        ]
    )
    header = [
        "",
        "time vs cloud-only (less)",
        "bytes vs naive (fewer)",
        "cloud work offloaded",
        "cloud request rate",
    ]
    lines += _table(header, rows)
    lines += [""] + relative_table(runs, links[0], tau0) + discussion(data, runs) + [""]
    lines += speculative_section(runs, links[0])
    lines += ["## tau sweep (1 client)", ""]
    rows = []
    for link in links:
        ref = find(runs, mode="cloud-only", link=link, clients=1)
        for tau in taus:
            r = find(runs, mode="ce-collm", link=link, tau=tau, clients=1, encoding="fp16")
            if r is None:
                continue
            by_time, by_rows = offload(r, ref)
            rows.append(
                [
                    link,
                    f"{tau:g}",
                    _f(r.total_s),
                    _f(r.total_s / ref.total_s) + "×" if ref else "—",
                    _f(r.cloud_s),
                    _f(r.edge_s),
                    _f(r.comm_s),
                    _kb(r.bytes_total),
                    _pct(r.cloud_rate),
                    _pct(by_time),
                    _pct(by_rows),
                    _pct(r.agreement_pos),
                    _pct(r.exact),
                    _f(r.bpc, "{:.3f}"),
                ]
            )
    header = ["link", "tau", "total s", "vs cloud-only", "cloud s", "edge s", "comm s"]
    header += ["KB sent", "cloud request rate", "offloaded (time)", "(layer-rows)"]
    header += ["agreement (positions)", "exact seqs", "bits/char (served stream)"]
    lines += ["CE-CoLLM collaborative:", ""] + _table(header, rows) + [""]
    rows = []
    for tau in taus:
        r = find(runs, mode="standalone", tau=tau, clients=1)
        if r is None:
            continue
        exits = ", ".join(f"L{k}: {_pct(v / r.tokens)}" for k, v in sorted(r.exit_tokens.items()))
        rows.append(
            [
                f"{tau:g}",
                _f(r.total_s),
                _f(r.edge_s),
                exits,
                _pct(r.agreement_pos),
                _pct(r.agreement_prefix),
                _pct(r.exact),
                _f(r.bpc, "{:.3f}"),
            ]
        )
    header = ["tau", "total s", "edge s", "tokens by exit layer", "agreement (positions)"]
    header += ["(prefix)", "exact seqs", "bits/char (served stream)"]
    lines += ["Edge standalone (no link):", ""] + _table(header, rows) + [""]
    clients = sorted({r.clients for r in runs})
    if len(clients) > 1:
        link = cfg["clients_link"]
        lines += [f"## Several edge clients ({link}, tau = {tau0:g})", ""]
        rows = []
        for mode in ("cloud-only", "ce-collm"):
            kw = {} if mode == "cloud-only" else {"tau": tau0}
            base = find(runs, mode=mode, link=link, clients=1, encoding="fp16", **kw)
            for n in clients:
                r = find(runs, mode=mode, link=link, clients=n, encoding="fp16", **kw)
                if r is None:
                    continue
                per_cloud_tok = r.cloud_s / r.cloud_tokens if r.cloud_tokens else None
                rows.append(
                    [
                        MODE_LABEL[mode],
                        n,
                        _f(r.total_s),
                        _f(r.total_s / base.total_s) + "×" if base else "—",
                        _f(r.cloud_s),
                        _f(r.edge_s),
                        _f(r.comm_s),
                        _f(None if per_cloud_tok is None else 1e3 * per_cloud_tok, "{:.0f}"),
                        _f(1e3 * r.dec_s / r.dec_tokens if r.dec_tokens else None, "{:.0f}"),
                        _pct(r.cloud_rate) if mode == "ce-collm" else "—",
                        _pct(r.agreement_pos),
                    ]
                )
        header = ["mode", "clients", "total s per client", "vs 1 client", "cloud s"]
        header += ["edge s", "comm s", "cloud ms per cloud token (prefill included)"]
        header += ["decode ms/token", "cloud request rate"]
        header += ["agreement (positions)"]
        lines += _table(header, rows)
        lines += [
            "",
            "Times are per client (mean over the clients, each sending every prompt). The "
            "cloud-only server batches concurrent requests (continuous batching); the cloud "
            "context manager batches the token requests that queue while its model is busy "
            "(one forward over their sessions' catch-up rows). Edge clients share one core "
            "here, so their edge time grows with their number.",
            "",
        ]
    if bpc.get("exited " + f"{taus[0]:g}") is not None:
        lines += [
            "## Teacher-forced on corpus text",
            "",
            f"{bpc.get('texts', '?')} corpus test texts ({bpc.get('tokens', '?')} tokens). "
            "The full model's bits/char when its upper layers read the split states as "
            "transported (bf16 = cloud-only):",
            "",
        ]
        rows = [
            [
                _f(bpc.get("cloud-only"), "{:.3f}"),
                _f(bpc.get("fp16"), "{:.3f}"),
                _f(bpc.get("int8"), "{:.3f}"),
            ]
        ]
        lines += _table(["bf16 (cloud-only)", "fp16 states", "int8 states"], rows)
        rows = []
        for tau in taus:
            t = f"{tau:g}"
            rows.append(
                [
                    t,
                    _pct(bpc.get(f"exited {t}")),
                    _pct(bpc.get(f"exit agreement {t}")),
                    _pct(bpc.get(f"cloud rate {t}")),
                ]
            )
        lines += [
            "",
            "Edge exits on the same positions (exits up to the split; a confident exit's "
            "token is a hard decision, scored by agreement with the full model's argmax, "
            "not by bits):",
            "",
        ]
        lines += _table(["tau", "exited", "agreement (exited)", "sent to the cloud"], rows)
        lines.append("")
    return "\n".join(lines) + "\n"


def decode_table(runs: Sequence[Run], link: str, tau: float, prompts: int) -> list[str]:
    """Per generated token after each prompt's first (decode phase), and the first token."""
    rows = []
    for mode, enc in (
        ("cloud-only", "fp16"),
        ("naive", "fp16"),
        ("standalone", "fp16"),
        ("ce-collm", "fp16"),
        ("ce-collm", "int8"),
    ):
        r = find_mode(runs, mode, link, tau, enc)
        if r is None or not r.dec_tokens:
            continue
        n = r.dec_tokens
        ask = (r.dec_cloud_s + r.dec_comm_s) / r.dec_cloud_tokens if r.dec_cloud_tokens else None
        rows.append(
            [
                MODE_LABEL[r.mode] + (" int8" if r.encoding == "int8" else ""),
                _f(r.ttft_s / prompts),
                _f(1e3 * r.dec_s / n, "{:.0f}"),
                _f(1e3 * r.dec_edge_s / n, "{:.0f}"),
                _f(1e3 * r.dec_cloud_s / n, "{:.0f}"),
                _f(1e3 * r.dec_comm_s / n, "{:.0f}"),
                _f(None if ask is None else 1e3 * ask, "{:.0f}"),
            ]
        )
    header = ["mode", "first token s (per prompt)", "decode ms/token", "edge ms/token"]
    header += ["cloud ms/token", "comm ms/token", "ms per cloud token (cloud + comm)"]
    return [
        f"Decode phase ({link}, tau = {tau:g}): per generated token after each prompt's "
        "first; the first token (prompt prefill and, for the split modes, the prompt's "
        "upload) separately.",
        "",
        *_table(header, rows),
        "",
    ]


def relative_table(runs: Sequence[Run], link: str, tau: float) -> list[str]:
    """The paper's inference-time table next to ours, both as fractions of cloud-only's
    total time (absolute seconds are not comparable: GPUs and 100 samples vs CPU)."""
    ref = find(runs, mode="cloud-only", link=link, clients=1)
    if ref is None or not ref.total_s:
        return []
    p_ref = PAPER["time_s"]["cloud-only"]
    rows = []
    for mode in ("cloud-only", "naive", "standalone", "ce-collm"):
        r = find_mode(runs, mode, link, tau)
        paper = [PAPER[k][mode] / p_ref for k in ("time_s", "cloud_s", "edge_s", "comm_s")]
        ours = [None] * 4 if r is None else [r.total_s, r.cloud_s, r.edge_s, r.comm_s]
        ours = [None if x is None else x / ref.total_s for x in ours]
        rows.append(
            [MODE_LABEL[mode]] + [f"{_f(o)} ({_f(q)})" for o, q in zip(ours, paper, strict=True)]
        )
    header = ["mode", "total: ours (paper)", "cloud", "edge", "communication"]
    return [
        f"Time as a fraction of cloud-only's total ({link}, tau = {tau:g}; the paper's "
        "Alpaca table in parentheses):",
        "",
        *_table(header, rows),
        "",
    ]


def speculative_section(runs: Sequence[Run], link: str) -> list[str]:
    """The lossless mode beside cloud-only and CE-CoLLM at the same tau."""
    spec = sorted(
        (r for r in runs if r.mode == "speculative" and r.link == link and r.clients == 1),
        key=lambda r: r.tau,
    )
    ref = find(runs, mode="cloud-only", link=link, clients=1)
    if not spec or ref is None:
        return []
    header = [
        "tau",
        "mode",
        "total s",
        "vs cloud-only",
        "cloud s",
        "edge s",
        "comm s",
        "KB sent",
        "blocking requests / token",
        "drafts / token",
        "drafts accepted",
        "agreement (positions)",
        "exact seqs",
    ]
    rows = []
    for r in spec:
        ce = find(runs, mode="ce-collm", link=link, tau=r.tau, clients=1, encoding="fp16")
        for x in (ce, r) if ce is not None else (r,):
            is_spec = x.mode == "speculative"
            rows.append(
                [
                    f"{x.tau:g}",
                    "speculative" if is_spec else "CE-CoLLM",
                    _f(x.total_s),
                    f"{x.total_s / ref.total_s:.2f}×",
                    _f(x.cloud_s),
                    _f(x.edge_s),
                    _f(x.comm_s),
                    _kb(x.bytes_total),
                    _f(x.token_requests / x.tokens if x.tokens else None),
                    _f(x.drafts / x.tokens if is_spec and x.tokens else None),
                    _pct(1 - x.rollbacks / x.drafts if is_spec and x.drafts else None),
                    _pct(x.agreement_pos),
                    _pct(x.exact),
                ]
            )
    return [
        f"## Lossless collaborative mode (`--collab speculative`, {link}, 1 client)",
        "",
        "Confident edge tokens are drafts: the edge keeps decoding on them while the cloud "
        "runs its layers on each uploaded row and checks the draft against its own greedy "
        "token; a rejected draft rolls the edge back to its position and the cloud's token "
        "replaces it. The edge blocks only on unconfident tokens (and to flush its drafts at "
        "the end of a sequence). Greedy output must equal cloud-only's at every tau "
        f"(agreement 100%). Cloud-only: {ref.total_s:.2f} s. *Blocking requests*: token "
        "requests the edge waited for, per generated token.",
        "",
        *_table(header, rows),
        "",
    ]


def _always_slower(runs: Sequence[Run]) -> bool:
    pairs = [
        (r, find(runs, mode="cloud-only", link=r.link, clients=1))
        for r in runs
        if r.mode == "ce-collm" and r.clients == 1
    ]
    return bool(pairs) and all(ref is not None and r.total_s > ref.total_s for r, ref in pairs)


def discussion(data: dict, runs: Sequence[Run]) -> list[str]:
    """Why our figures differ from the paper's, with this run's numbers."""
    cfg = data["config"]
    link, tau0 = cfg["links"][0], cfg["tau_main"]
    ref = find(runs, mode="cloud-only", link=link, clients=1)
    ce = find(runs, mode="ce-collm", link=link, tau=tau0, clients=1, encoding="fp16")
    naive = find(runs, mode="naive", link=link, tau=tau0, clients=1)
    sa = find(runs, mode="standalone", tau=tau0, clients=1)
    i8 = find(runs, mode="ce-collm", link=link, tau=tau0, clients=1, encoding="int8")
    if ref is None or ce is None or not ce.tokens:
        return []
    out = [f"Why the numbers differ (first link, tau = {tau0:g}):", ""]
    full_tok = ref.dec_s / ref.dec_tokens if ref.dec_tokens else None
    edge_tok = ce.dec_edge_s / ce.dec_tokens if ce.dec_tokens else None
    ask = (ce.dec_cloud_s + ce.dec_comm_s) / ce.dec_cloud_tokens if ce.dec_cloud_tokens else None
    if full_tok and edge_tok and ask:
        even = (full_tok - edge_tok) / ask
        out.append(
            f"- **Time.** In the decode phase cloud-only costs {1e3 * full_tok:.0f} ms per "
            f"token here; CE-CoLLM runs the edge half first ({1e3 * edge_tok:.0f} ms per "
            f"token, emulated {cfg['cloud_speed']:g}× slower than the cloud) and then, for a "
            f"cloud token, waits {1e3 * ask:.0f} ms for the cloud half plus the round trip. "
            f"It beats cloud-only only when fewer than {100 * max(even, 0):.0f}% of tokens go "
            f"to the cloud; our exit heads send {100 * ce.cloud_rate:.0f}% (the paper: "
            f"49.58%), so CE-CoLLM takes {ce.total_s / ref.total_s:.2f}× cloud-only's time "
            f"(the paper: 0.86×). Its first token takes {ce.ttft_s / cfg['prompts']:.2f} s per "
            f"prompt (cloud-only: {ref.ttft_s / cfg['prompts']:.2f} s): the edge prefills its "
            "half, the prompt's split states cross the link, then the cloud prefills its half."
        )
    out.append(
        f"- **Cloud request rate.** Our heads are small low-rank adapters distilled on "
        f"8k–24k corpus tokens (docs/bench/exits.md) over a shortlist, at layers "
        f"{', '.join(str(e) for e in cfg['edge_exits'])} of {cfg['upstream']} "
        f"({cfg['n_layers']} layers); few tokens reach tau there. The paper's exits "
        "(1/4 and 1/2 of a LLaMA-2-7B-class model, very likely EE-LLM checkpoints "
        "trained with the exits) are confident for about half of Alpaca's tokens."
    )
    if naive is not None and naive.bytes_total:
        ctx = naive.positions_sent / max(naive.token_requests, 1)
        out.append(
            f"- **Bytes.** Naive resends the whole context with each request ({ctx:.0f} "
            f"positions × {2 * cfg['hidden_size']} B on average here); CE-CoLLM sends each "
            f"position once, so it saves {100 * (1 - ce.bytes_total / naive.bytes_total):.1f}%."
            " The saving grows with the number of cloud requests per prompt: with "
            f"{cfg['max_tokens']} new tokens after ~{cfg['prompt_tokens_min']}–"
            f"{cfg['prompt_tokens_max']} prompt tokens the one-time prompt upload weighs "
            "more than with the paper's longer Alpaca answers (99.15%). Cloud-only sends only "
            f"text: {ref.bytes_total / 1e3:.1f} KB per client."
        )
        out.append(
            f"- **Naive's cloud time** is {naive.cloud_s / ref.cloud_s:.1f}× cloud-only's here "
            "(the paper: 0.69×): each request starts a fresh cloud session and recomputes the "
            "whole context through the upper layers. On a GPU that forward costs about one "
            "token's time; on one CPU core it costs about as many token-times as there are "
            "rows."
        )
    by_time, by_rows = offload(ce, ref)
    if by_time is not None and by_rows is not None:
        out.append(
            f"- **Offload.** {100 * by_time:.1f}% of cloud-only's cloud time moved to the edge "
            f"({100 * by_rows:.1f}% of its layer-rows; the paper: 69.52%). The context manager "
            "still runs the upper layers for every position up to the last cloud request "
            "(catch-up), so with a high cloud request rate the cloud keeps about "
            f"{cfg['n_layers'] - cfg['split']}/{cfg['n_layers']} of the layer work; exited "
            "tokens save cloud work only after the last request of a sequence."
        )
    if sa is not None:
        out.append(
            f"- **Standalone** takes {sa.total_s / ref.total_s:.2f}× cloud-only's time "
            f"(the paper: 0.54×) but keeps {100 * (sa.agreement_pos or 0):.0f}% of "
            f"cloud-only's tokens at the same position; its served stream costs "
            f"{_f(sa.bpc, '{:.3f}')} bits/char under the full model vs cloud-only's "
            f"{_f(ref.bpc, '{:.3f}')}."
        )
    if i8 is not None:
        out.append(
            f"- **int8 transport** sends {100 * i8.bytes_total / ce.bytes_total:.0f}% of "
            f"fp16's bytes; greedy agreement with cloud-only {_pct(i8.agreement_pos)} "
            f"(fp16: {_pct(ce.agreement_pos)}), bits/char {_f(i8.bpc, '{:.3f}')} (fp16: "
            f"{_f(ce.bpc, '{:.3f}')})."
        )
    ratios = []
    for n in sorted({r.clients for r in runs}):
        a = find(runs, mode="ce-collm", link=cfg["clients_link"], tau=tau0, clients=n)
        b = find(runs, mode="cloud-only", link=cfg["clients_link"], clients=n)
        if a is not None and b is not None and a.encoding == "fp16":
            ratios.append(f"{n}: {a.total_s / b.total_s:.2f}×")
    if len(ratios) > 1:
        out.append(
            "- **Several clients.** CE-CoLLM's time relative to cloud-only, per number of "
            f"clients: {', '.join(ratios)}. The cloud's time per client (cloud s, queueing "
            "included) stays about half of cloud-only's at every client count, so one cloud "
            "replica carries more clients; latency per client still grows with the number of "
            "clients here, because the edge clients share one core (a real deployment has a "
            "device per client) and both servers share the other."
        )
    t = data.get("timing", {})
    spread = []
    for lk in cfg["links"]:
        a = find(runs, mode="ce-collm", link=lk, tau=0.9, clients=1, encoding="fp16")
        b = find(runs, mode="ce-collm", link=lk, tau=1.0, clients=1, encoding="fp16")
        if a is not None and b is not None:
            spread.append(abs(a.total_s - b.total_s) / min(a.total_s, b.total_s))
    only = [r.total_s for r in runs if r.mode == "cloud-only" and r.clients == 1]
    if len(only) > 1:  # the same work: the link adds well under 1% to cloud-only
        spread.append(max(only) / min(only) - 1)
    if "loadavg_start" in t:
        same = (
            "; rows that do (nearly) the same work, cloud-only on both links and CE-CoLLM at "
            f"tau 0.9 and 1.0, differ by up to {100 * max(spread):.0f}% in total time, so "
            "single differences below that are not significant"
            + (
                " (CE-CoLLM is slower than cloud-only in every tau/link row, and the "
                "decode-phase numbers above say why)"
                if _always_slower(runs)
                else ""
            )
            if spread
            else ""
        )
        out.append(
            "- **Noise.** Other work shared the machine (load average "
            f"{t['loadavg_start'][0]:.1f} at the start, {t['loadavg_end'][0]:.1f} at the end "
            f"of the timed runs){same}."
        )
    out.append(
        f"- **Scale.** {cfg['prompts']} prompts × {cfg['max_tokens']} tokens on CPU cores, "
        "not 100 Alpaca samples on GPUs: compare ratios, not seconds."
    )
    return out


# ---- plot ------------------------------------------------------------------------------------


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = data["config"]
    runs = [Run(**r) for r in data["runs"]]
    links, taus, tau0 = cfg["links"], cfg["taus"], cfg["tau_main"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, link in enumerate(links):
        c = colors[i % len(colors)]
        pts = [
            (t, r.total_s)
            for t in taus
            if (r := find(runs, mode="ce-collm", link=link, tau=t, clients=1, encoding="fp16"))
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", c=c, label=f"CE-CoLLM, {link}")
        ref = find(runs, mode="cloud-only", link=link, clients=1)
        if ref is not None:
            ax.axhline(ref.total_s, ls="--", c=c, label=f"cloud-only, {link}")
    pts = [(t, r.total_s) for t in taus if (r := find(runs, mode="standalone", tau=t, clients=1))]
    if pts:
        ax.plot(*zip(*pts, strict=True), "s:", c="gray", label="edge standalone")
    ax.set_xlabel("tau (confidence threshold)")
    ax.set_ylabel("total time per client (s)")
    ax.set_title(f"{cfg['model']}: time vs tau (cloud {cfg['cloud_speed']:g}× edge speed)")
    ax.legend(fontsize=7)
    ax.set_ylim(bottom=0)
    modes = [("cloud-only", "fp16"), ("naive", "fp16"), ("ce-collm", "fp16"), ("ce-collm", "int8")]
    width = 0.8 / max(len(links), 1)
    for i, link in enumerate(links):
        vals = []
        for mode, enc in modes:
            kw = {} if mode == "cloud-only" else {"tau": tau0}
            r = find(runs, mode=mode, link=link, clients=1, encoding=enc, **kw)
            vals.append(r.bytes_total if r else float("nan"))
        xs = [j + (i - (len(links) - 1) / 2) * width for j in range(len(modes))]
        bx.bar(xs, vals, width, label=link, color=colors[i % len(colors)])
    bx.set_xticks(range(len(modes)))
    bx.set_xticklabels(["cloud-only", "naive", "CE-CoLLM fp16", "CE-CoLLM int8"], fontsize=8)
    bx.set_yscale("log")
    bx.set_ylabel("bytes sent per client (up + down)")
    bx.set_title(f"bytes per mode, tau = {tau0:g}")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
