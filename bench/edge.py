"""`make bench-edge`: edge decode at batch 1, Tandem against llama.cpp, side by side in one run.

For each model (smollm2, gemma3, qwen05, qwen15 by default), in one run:
- Tandem as served (`spec.default_quant`, exits at `spec.default_tau`), in its own process
  (bench/tandem_side.py, the project's .venv),
- llama.cpp (llama-cpp-python 0.3.36, `make llamacpp-venv`) on the same GGUF file, in its own
  process (bench/llamacpp_side.py, .venv-llamacpp),
both with 2 threads, greedy, the same prompt token ids, the same number of decode steps
(64, EOS ignored), decode timed apart from prefill (each side's docstring says exactly how),
best of N after a warm-up pass; prefill tok/s on the same 512-token prompt; each process's RSS.
The machine's read bandwidth (bench/machine.read_bandwidth_gbs) is measured in the same run,
before, between and after the models (the highest is the limit), and each side's weight
bytes per decoded token (bench/weight_bytes.py; llama.cpp's from the GGUF tensor sizes) give
the achieved GB/s and the fraction of that limit.

Writes docs/bench/edge.md, edge.json and edge.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.machine import cpu_name, read_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("docs/bench")
LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
DECODE_PROMPT = "The capital of France is"
NEW_TOKENS = 64
PREFILL_TOKENS = 512
THREADS = 2
SIDE_TIMEOUT_S = 1800


@dataclass
class Side:
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    rss_mb: float | None = None
    bytes_per_token: float | None = None
    warmup_s: float | None = None
    load_s: float | None = None
    error: str | None = None


@dataclass
class EdgeRow:
    model: str
    quant: str
    tau: float
    compiled: bool
    ours: Side
    cpp: Side
    exit_fraction: float | None = None
    agreement: float | None = None  # greedy tokens before the first divergence / all
    eager_agreement: float | None = None  # the same, compiled against Tandem's eager path
    bpc: float | None = None
    extra: dict = field(default_factory=dict)
    # Decode tok/s [Tandem, llama.cpp] of each round (--rounds): the pair's processes run
    # again, in alternating order, and the row reports medians (the host's bandwidth drifts
    # between the minutes each side runs in).
    decode_rounds: list[list[float]] = field(default_factory=list)

    def ratio(self, attr: str) -> float | None:
        if attr == "decode_tok_s" and len(self.decode_rounds) > 1:
            return statistics.median(o / c for o, c in self.decode_rounds)
        a, b = getattr(self.ours, attr), getattr(self.cpp, attr)
        return a / b if a and b else None

    def add_round(self, other: EdgeRow) -> None:
        """Another round's decode speeds; the row's decode tok/s become the medians."""
        if not self.decode_rounds and self.ours.decode_tok_s and self.cpp.decode_tok_s:
            self.decode_rounds.append([self.ours.decode_tok_s, self.cpp.decode_tok_s])
        if other.ours.decode_tok_s and other.cpp.decode_tok_s and self.decode_rounds:
            self.decode_rounds.append([other.ours.decode_tok_s, other.cpp.decode_tok_s])
            self.ours.decode_tok_s = statistics.median(o for o, _ in self.decode_rounds)
            self.cpp.decode_tok_s = statistics.median(c for _, c in self.decode_rounds)


def _run_side(
    argv: list[str], job: dict, label: str, env: dict[str, str] | None = None
) -> tuple[dict | None, str | None]:
    """Run one side's process; (its JSON result, None) or (None, why it failed)."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            input=json.dumps(job),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=SIDE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None, f"{label} timed out after {SIDE_TIMEOUT_S} s"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return None, f"{label} failed (exit {proc.returncode}): {' | '.join(tail)}"
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            print(f"[bench-edge] {label}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
            return json.loads(line), None
    return None, f"{label} printed no result"


def _agreement(a: list[int], b: list[int]) -> float:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(b), 1)


def prompts(codec) -> tuple[list[int], list[int]]:
    """The decode prompt and a PREFILL_TOKENS-token prompt of held-out corpus text."""
    from tandem.data.corpus import load_corpus

    ids: list[int] = []
    k = 4
    while len(ids) < PREFILL_TOKENS:
        text = "\n\n".join(s.text for s in load_corpus("heldout", k))
        ids = codec.encode(text)
        k *= 2
    return codec.encode(DECODE_PROMPT), ids[:PREFILL_TOKENS]


def bench_model(model_id: str, a: argparse.Namespace, tandem_first: bool = False) -> EdgeRow:
    from bench.weight_bytes import gguf_decode_bytes
    from tandem.models.convert import ensure_converted
    from tandem.models.fetch import gguf_path
    from tandem.models.registry import ModelRegistry
    from tandem.models.tokenizer import TextCodec

    cache = Path("model_cache")
    spec = ModelRegistry().get(model_id)
    gguf = gguf_path(spec, cache)
    codec = TextCodec(ensure_converted(spec, cache), ())  # converted here, not in a side
    decode_prompt, prefill_prompt = prompts(codec)
    job = {
        "threads": THREADS,
        "new_tokens": NEW_TOKENS,
        "repeats": a.repeats,
        "decode_prompt": decode_prompt,
        "prefill_prompt": prefill_prompt,
    }

    def run_cpp() -> tuple[dict | None, str | None]:
        if a.no_llamacpp:
            return None, "llama.cpp skipped (--no-llamacpp)"
        if not LLAMACPP_PYTHON.exists():
            return None, "llama.cpp NOT RUN: .venv-llamacpp is missing (run `make llamacpp-venv`)"
        return _run_side(
            [str(LLAMACPP_PYTHON), str(ROOT / "bench" / "llamacpp_side.py")],
            {**job, "gguf": str(gguf.resolve())},
            f"{model_id} llama.cpp",
        )

    def run_ours() -> tuple[dict | None, str | None]:
        return _run_side(
            [sys.executable, "-m", "bench.tandem_side"],
            {
                **job,
                "model": model_id,
                "compiled": not a.eager,
                "check_eager": not a.eager and not getattr(a, "speed_only", False),
                "quality_texts": a.quality_texts,
            },
            f"{model_id} tandem",
        )

    if tandem_first:
        ours_res, ours_err = run_ours()
        cpp_res, cpp_err = run_cpp()
    else:
        cpp_res, cpp_err = run_cpp()
        ours_res, ours_err = run_ours()
    if cpp_err:
        print(f"[bench-edge] WARNING {model_id}: {cpp_err}", file=sys.stderr)
    if ours_err:
        print(f"[bench-edge] WARNING {model_id}: {ours_err}", file=sys.stderr)
    ours = Side(error=ours_err)
    if ours_res:
        for k in ("decode_tok_s", "prefill_tok_s", "rss_mb", "bytes_per_token", "warmup_s"):
            setattr(ours, k, ours_res[k])
        ours.load_s = ours_res["load_s"]
    cpp = Side(error=cpp_err)
    if cpp_res:
        for k in ("decode_tok_s", "prefill_tok_s", "rss_mb", "warmup_s", "load_s"):
            setattr(cpp, k, cpp_res[k])
        cpp.bytes_per_token = gguf_decode_bytes(gguf)
    row = EdgeRow(
        model=model_id,
        quant=spec.default_quant
        + (f" ({spec.default_head_quant} head)" if spec.default_head_quant else ""),
        tau=spec.default_tau,
        compiled=bool(ours_res and ours_res["compiled"]),
        ours=ours,
        cpp=cpp,
    )
    if ours_res:
        row.exit_fraction = ours_res["exit_fraction"]
        row.bpc = ours_res["bpc"]
        row.extra["ours_peak_rss_mb"] = ours_res["peak_rss_mb"]
        row.extra["ours_bytes_full_depth"] = ours_res["bytes_full_depth"]
        row.extra["ours_warmup_pass_s"] = ours_res["warmup_pass_s"]
        row.extra["ours_compile_s"] = ours_res.get("compile_s")
        if ours_res.get("eager_tokens"):
            row.eager_agreement = _agreement(ours_res["tokens"], ours_res["eager_tokens"])
    if cpp_res:
        row.extra["cpp_version"] = cpp_res["version"]
        row.extra["cpp_system_info"] = cpp_res["system_info"]
        row.extra["cpp_peak_rss_mb"] = cpp_res["peak_rss_mb"]
    if ours_res and cpp_res:
        row.agreement = _agreement(ours_res["tokens"], cpp_res["tokens"])
    for key, res in (("ours_text", ours_res), ("cpp_text", cpp_res)):
        if res:  # what each side generated, to eyeball in edge.json
            row.extra[key] = codec.decode(res["tokens"][:24])
    return row


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _gbs(side: Side) -> float | None:
    if side.decode_tok_s is None or side.bytes_per_token is None:
        return None
    return side.decode_tok_s * side.bytes_per_token / 1e9


def render(data: dict) -> str:
    rows = [_row_from_json(r) for r in data["rows"]]
    bw = data["bandwidth_gbs"]
    s = data["settings"]
    cpp_version = next((r.extra["cpp_version"] for r in rows if "cpp_version" in r.extra), None)
    lines = [
        "# Edge decode at batch 1: Tandem vs llama.cpp (`make bench-edge`)",
        "",
        f"Machine: {data['machine']}. Measured read bandwidth in this run: "
        f"**{bw:.1f} GB/s** ({THREADS}-thread torch sum over 512 MB, best of 7, the highest of "
        "measurements before, between and after the models: "
        f"{' / '.join(f'{x:.1f}' for x in _bw_all(data))}). On a shared machine the probe can "
        "read low; an achieved fraction above 100% means it did.",
        "",
        f"Both sides: {s['threads']} threads, the same GGUF file, the same prompt token ids, "
        f"greedy, EOS ignored, best of {s['repeats']} after a warm-up pass, each side in its "
        "own process. **Decode**: "
        f"{s['new_tokens']} single-token decode steps after the prompt "
        f"({len(DECODE_PROMPT)}-character prompt), prefill not included: Tandem times "
        "`new_tokens` calls of `ExitDecoder.decode` + greedy pick after `prefill`; llama.cpp "
        f"(llama-cpp-python {cpp_version or '0.3.36'}) times its `Llama.generate` iterator "
        "from the first yielded token (prompt evaluated and sampled) to the "
        f"{s['new_tokens'] + 1}-th. **Prefill**: one {s['prefill_tokens']}-token prompt "
        "(held-out corpus text) into an empty cache: `ExitDecoder.prefill` / `Llama.eval`. "
        "**RSS**: VmRSS of each side's process after its timed runs (the GGUF mmap counts for "
        "llama.cpp). Tandem runs as served: registry default quantization, exits at the "
        f"default tau; {'compiled' if s['compiled'] else 'eager (--eager)'} decode path."
        + (
            f" **Rounds**: each model's pair of processes ran {s['rounds']} times, llama.cpp "
            "first in odd rounds and Tandem first in even ones; decode tok/s are the medians "
            "over the rounds and the decode ratio the median of the rounds' ratios (the "
            "host's bandwidth drifts between the minutes the two sides run in). Prefill, RSS "
            "and the quality checks are from the first round."
            if s.get("rounds", 1) > 1
            else ""
        ),
        "",
        "| model | quant / tau | Tandem decode tok/s | llama.cpp decode tok/s | decode ratio |"
        " Tandem prefill tok/s | llama.cpp prefill tok/s | prefill ratio |"
        " Tandem RSS MB | llama.cpp RSS MB | Tandem warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.quant} / {r.tau:g} | {_f(r.ours.decode_tok_s)} | "
            f"{_f(r.cpp.decode_tok_s)} | **{_f(r.ratio('decode_tok_s'), '{:.2f}×')}** | "
            f"{_f(r.ours.prefill_tok_s, '{:.0f}')} | {_f(r.cpp.prefill_tok_s, '{:.0f}')} | "
            f"{_f(r.ratio('prefill_tok_s'), '{:.2f}×')} | {_f(r.ours.rss_mb, '{:.0f}')} | "
            f"{_f(r.cpp.rss_mb, '{:.0f}')} | {_f(r.ours.warmup_s)} |"
        )
    if any(len(r.decode_rounds) > 1 for r in rows):
        lines += [
            "",
            "Decode ratio of each round (Tandem tok/s / llama.cpp tok/s):",
            "",
            "| model | " + " | ".join(f"round {i + 1}" for i in range(s["rounds"])) + " |",
            "|---|" + "---|" * s["rounds"],
        ]
        for r in rows:
            cells = [f"{o / c:.2f}× ({o:.1f} / {c:.1f})" for o, c in r.decode_rounds]
            cells += ["—"] * (s["rounds"] - len(cells))
            lines.append(f"| {r.model} | " + " | ".join(cells) + " |")
    errors = [(r.model, side) for r in rows for side in (r.ours, r.cpp) if side.error]
    if errors:
        lines += ["", "**Rows that did not run:**", ""]
        lines += [f"- **{m}: {side.error}**" for m, side in errors]
    lines += [
        "",
        "## Memory-bandwidth bound",
        "",
        "Weight bytes per decoded token: every weight buffer a token reads (quantized weights, "
        "scales, norms, biases, the exit heads it passes, the LM head; one embedding row, not "
        "the table), averaged over the decoded tokens (exited tokens read fewer layers). "
        "llama.cpp's: its GGUF tensors (the whole embedding table when the output matrix is "
        "tied to it). Achieved = bytes per token × decode tok/s; fraction = achieved / "
        f"measured bandwidth ({bw:.1f} GB/s). KV-cache reads are not counted.",
        "",
        "| model | Tandem MB/token | Tandem GB/s | Tandem % of bandwidth |"
        " llama.cpp MB/token | llama.cpp GB/s | llama.cpp % of bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        og, cg = _gbs(r.ours), _gbs(r.cpp)
        mb = lambda side: None if side.bytes_per_token is None else side.bytes_per_token / 1e6  # noqa: E731
        lines.append(
            f"| {r.model} | {_f(mb(r.ours))} | {_f(og)} | "
            f"{_f(None if og is None else 100 * og / bw, '{:.0f}%')} | {_f(mb(r.cpp))} | "
            f"{_f(cg)} | {_f(None if cg is None else 100 * cg / bw, '{:.0f}%')} |"
        )
    lines += [
        "",
        "## Quality (cheap checks)",
        "",
        "Greedy agreement: fraction of the "
        f"{s['new_tokens'] + 1} greedy tokens of the decode run before Tandem's and llama.cpp's "
        "outputs first differ (different quantizations of the same model, so 100% is not "
        "expected). Bits/char: Tandem as served, teacher-forced on held-out corpus text "
        f"({s['quality_texts']} texts per source; — when skipped). Exited: fraction of the "
        "decoded tokens that left at an exit head. Compiled = eager: the same measure between "
        "Tandem's compiled decode path and its eager reference path (same weights, same "
        "exits), which must be 100%.",
        "",
        "| model | greedy agreement with llama.cpp | Tandem compiled = eager |"
        " Tandem bits/char | exited |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {_f(r.agreement, '{:.0%}')} | {_f(r.eager_agreement, '{:.0%}')} | "
            f"{_f(r.bpc, '{:.3f}')} | {_f(r.exit_fraction, '{:.0%}')} |"
        )
    info = next((r.extra["cpp_system_info"] for r in rows if "cpp_system_info" in r.extra), None)
    if info:
        lines += ["", f"llama.cpp build (`llama_print_system_info`): `{info}`"]
    if data.get("transformers"):
        lines += [
            "",
            "## transformers baseline (--transformers)",
            "",
            f"`generate` in bf16, {NEW_TOKENS} new tokens, prefill included, best of 2.",
            "",
            "| model | transformers bf16 tok/s |",
            "|---|---|",
        ]
        lines += [f"| {m} | {t:.1f} |" for m, t in data["transformers"].items()]
    return "\n".join(lines) + "\n"


def _bw_all(data: dict) -> list[float]:
    between = data.get("bandwidth_between_gbs", [])
    return [data["bandwidth_before_gbs"], *between, data["bandwidth_after_gbs"]]


def _row_from_json(r: dict) -> EdgeRow:
    return EdgeRow(**{**r, "ours": Side(**r["ours"]), "cpp": Side(**r["cpp"])})


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_row_from_json(r) for r in data["rows"]]
    models = [r.model for r in rows]
    x = range(len(models))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attr, title in (
        (axes[0], "decode_tok_s", f"decode tok/s (batch 1, {NEW_TOKENS} tokens)"),
        (axes[1], "prefill_tok_s", f"prefill tok/s ({PREFILL_TOKENS}-token prompt)"),
    ):
        ours = [getattr(r.ours, attr) or 0.0 for r in rows]
        cpp = [getattr(r.cpp, attr) or 0.0 for r in rows]
        w = 0.38
        b1 = ax.bar([i - w / 2 for i in x], ours, w, label="Tandem (as served)")
        b2 = ax.bar([i + w / 2 for i in x], cpp, w, label="llama.cpp (same GGUF)")
        for bars in (b1, b2):
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        for i, r in enumerate(rows):
            ratio = r.ratio(attr)
            if ratio:
                top = max(ours[i], cpp[i])
                ax.annotate(
                    f"{ratio:.2f}×", (i, top * 1.13), ha="center", fontsize=8, weight="bold"
                )
        ax.set_xticks(list(x), models)
        ax.set_title(title)
        ax.set_ylim(0, max([*ours, *cpp, 1.0]) * 1.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['machine']}, {THREADS} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transformers_baseline(model_id: str) -> float:
    """transformers `generate` in bf16 (prefill included), best of 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tandem.models.convert import ensure_converted
    from tandem.models.registry import ModelRegistry

    path = ensure_converted(ModelRegistry().get(model_id), Path("model_cache"))
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok(DECODE_PROMPT).input_ids])
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        best = min(best, time.perf_counter() - t)
    return NEW_TOKENS / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,gemma3,qwen05,qwen15")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side (best of)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each model's pair of processes, in alternating order (median ratio)",
    )
    p.add_argument("--eager", action="store_true", help="Tandem's eager reference path")
    p.add_argument("--quality-texts", type=int, default=4, help="0: skip bits/char")
    p.add_argument("--no-llamacpp", action="store_true", help="Tandem side only")
    p.add_argument("--transformers", action="store_true", help="add the (slow) HF table")
    p.add_argument("--render-only", action="store_true", help="rewrite the reports from edge.json")
    p.add_argument("--out", type=Path, default=OUT, help="folder of edge.{md,json,png}")
    a = p.parse_args(argv)
    if a.render_only:
        write_reports(json.loads((a.out / "edge.json").read_text()), a.out)
        return
    torch.set_num_threads(THREADS)
    bw_before = read_bandwidth_gbs(threads=THREADS)
    print(f"[bench-edge] read bandwidth {bw_before:.1f} GB/s", file=sys.stderr)
    rows, bw_between = [], []
    for m in a.models.split(","):
        bw_between.append(read_bandwidth_gbs(threads=THREADS))
        rows.append(bench_model(m, a))
        print(f"[bench-edge] {asdict(rows[-1])}", file=sys.stderr)
        light = argparse.Namespace(**{**vars(a), "quality_texts": 0, "speed_only": True})
        for r in range(1, a.rounds):  # decode speeds only: no quality, no eager check
            again = bench_model(m, light, tandem_first=r % 2 == 1)
            rows[-1].add_round(again)
            print(f"[bench-edge] {m} round {r + 1}: {rows[-1].decode_rounds}", file=sys.stderr)
    bw_after = read_bandwidth_gbs(threads=THREADS)
    data = {
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "bandwidth_gbs": max(bw_before, bw_after, *bw_between),
        "bandwidth_before_gbs": bw_before,
        "bandwidth_after_gbs": bw_after,
        "bandwidth_between_gbs": bw_between,
        "settings": {
            "threads": THREADS,
            "new_tokens": NEW_TOKENS,
            "prefill_tokens": PREFILL_TOKENS,
            "repeats": a.repeats,
            "rounds": a.rounds,
            "compiled": not a.eager,
            "check_eager": not a.eager,
            "quality_texts": a.quality_texts,
        },
        "rows": [asdict(r) for r in rows],
    }
    if a.transformers:
        data["transformers"] = {m: transformers_baseline(m) for m in a.models.split(",")}
    write_reports(data, a.out)


def write_reports(data: dict, out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = render(data)
    (out / "edge.md").write_text(md)
    (out / "edge.json").write_text(json.dumps(data, indent=1))
    plot(data, out / "edge.png")
    print(md)


if __name__ == "__main__":
    main()
