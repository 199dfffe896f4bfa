"""`make bench-edge`: edge decode speed and quality, side by side in one run.

For each edge model it measures, in one process:
- transformers' own `generate` in bf16 (the baseline),
- ours in bf16, int8, int4, int8 with early exit (tau = 0.9, 0.8 and 0.6) and int4
  with early exit (tau = 0.9),
- llama.cpp on the same GGUF file when llama-cpp-python is installed (optional),

reporting decode tokens/s (64 new tokens, greedy, prefill included, best of 2), bits per
character on held-out text, and greedy agreement with our bf16 full-depth output (mean
fraction of tokens generated before the first divergence). Writes docs/bench/edge.md,
edge.json and edge.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.machine import cpu_name
from tandem.data.corpus import load_corpus
from tandem.models.convert import ensure_converted
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import decide, target_logprob
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams

OUT = Path("docs/bench")
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
NEW_TOKENS = 64
LLAMA_CPP_ANCHOR = {"smollm2": 108.7, "gemma3": 57.5, "qwen05": 43.5, "qwen15": 26.3}


@dataclass
class Row:
    model: str
    variant: str
    tok_s: float
    bpc: float | None
    agreement: float | None
    exit_fraction: float | None = None


def _time_generate(fn) -> tuple[float, list[list[int]]]:
    best, outs = math.inf, []
    for _ in range(2):
        outs = []
        t = time.perf_counter()
        for p in PROMPTS:
            outs.append(fn(p))
        best = min(best, time.perf_counter() - t)
    return len(PROMPTS) * NEW_TOKENS / best, outs


def _agreement(outs: list[list[int]], ref: list[list[int]]) -> float:
    fracs = []
    for a, b in zip(outs, ref, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        fracs.append(n / len(b))
    return sum(fracs) / len(fracs)


@torch.inference_mode()
def bits_per_char(lm: LoadedModel, texts: list[str], tau: float = 1.0) -> tuple[float, float]:
    """Teacher-forced bits/char. With tau < 1 each position's distribution comes from the
    first confident exit (shortlist; the "other" mass is spread evenly over the rest of
    the vocabulary), else from the final layer. Deferred KV is exact, so this equals what
    free-running decoding would assign at each position. Returns (bpc, exit fraction)."""
    model, heads = lm.model, (lm.heads if tau < 1.0 else [])
    bounds = [0, *[h.cfg.layer for h in heads], model.cfg.n_layers]
    nll, chars, exited, total = 0.0, 0, 0, 0
    for text in texts:
        ids = lm.codec.encode(text)[:256]
        n = len(ids)
        targets = torch.tensor(ids[1:])
        kv = model.new_kv()
        h = model.embed(torch.tensor(ids))
        logp = torch.empty(n - 1)
        decided = torch.zeros(n - 1, dtype=torch.bool)
        for i, head in enumerate(heads):
            h = model.run_sequence(h, kv, 0, bounds[i], bounds[i + 1])
            logits = head(h[:-1])
            d = decide(logits, head.shortlist, tau)
            take = d.confident & ~decided
            lp_target = target_logprob(logits, head.shortlist, targets, model.cfg.vocab_size)
            logp[take] = lp_target[take]
            decided |= take
        h = model.run_sequence(h, kv, 0, bounds[-2], bounds[-1])
        final = torch.log_softmax(model.logits(h[:-1]).float(), dim=-1)
        final_lp = final.gather(1, targets[:, None])[:, 0]
        logp[~decided] = final_lp[~decided]
        nll -= float(logp.sum())
        chars += len(lm.codec.decode(ids[1:]))
        exited += int(decided.sum())
        total += n - 1
    return nll / chars / math.log(2), exited / max(total, 1)


def _ours(lm: LoadedModel, tau: float):
    dec = ExitDecoder(lm.model, lm.heads)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return lambda p: list(generate(dec, lm.codec.encode(p), params, tau).token_ids)


def _transformers_baseline(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()

    def run(prompt: str) -> list[int]:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        return out[0, ids.shape[1] :].tolist()

    return run


def _llama_cpp(gguf: Path):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=2, n_ctx=512, verbose=False)

    def run(prompt: str) -> list[int]:
        out = llm.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=0.0)
        return [0] * out["usage"]["completion_tokens"]

    return run


def bench_model(model_id: str, texts: list[str], taus: tuple[float, ...]) -> list[Row]:
    spec = ModelRegistry().get(model_id)
    rows: list[Row] = []
    path = ensure_converted(spec, Path("model_cache"))
    tok_s, _ = _time_generate(_transformers_baseline(path))
    rows.append(Row(model_id, "transformers bf16", tok_s, None, None))
    ref_outs: list[list[int]] = []
    for quant in ("bf16", "int8", "int4"):
        lm = load_model(spec, LoadOptions(quant=quant, exits=True))
        tok_s, outs = _time_generate(_ours(lm, 1.0))
        if quant == "bf16":
            ref_outs = outs
        bpc, _ = bits_per_char(lm, texts)
        rows.append(Row(model_id, f"tandem {quant}", tok_s, bpc, _agreement(outs, ref_outs)))
        if quant != "bf16":
            for tau in taus if quant == "int8" else taus[:1]:
                tok_s, outs = _time_generate(_ours(lm, tau))
                bpc, frac = bits_per_char(lm, texts, tau)
                rows.append(
                    Row(
                        model_id,
                        f"tandem {quant} + exit tau={tau}",
                        tok_s,
                        bpc,
                        _agreement(outs, ref_outs),
                        frac,
                    )
                )
        del lm
    from tandem.models.fetch import gguf_path

    cpp = _llama_cpp(gguf_path(spec, Path("model_cache")))
    if cpp is not None:
        tok_s, _ = _time_generate(cpp)
        rows.append(Row(model_id, "llama.cpp (same GGUF)", tok_s, None, None))
    return rows


def render(rows: list[Row], machine: str) -> str:
    lines = [
        "# Edge decode benchmark (`make bench-edge`)",
        "",
        f"Machine: {machine}, 2 threads. Greedy, {NEW_TOKENS} new tokens per prompt "
        f"({len(PROMPTS)} prompts, prefill included, best of 2). Bits/char: teacher-forced on "
        "held-out corpus text (fortunes, wordnet, stdlib). Agreement: mean fraction of "
        "tokens before the first divergence from tandem bf16 full depth. All rows of one "
        "model come from the same run; compare ratios, not absolute numbers, across runs.",
        "",
        "| model | variant | tok/s | × transformers | bits/char | greedy agreement | exited |"
        " llama.cpp anchor (models.md) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r.model: r.tok_s for r in rows if r.variant == "transformers bf16"}
    for r in rows:
        fmt = lambda x, f: "—" if x is None else f.format(x)  # noqa: E731
        lines.append(
            f"| {r.model} | {r.variant} | {r.tok_s:.1f} | {r.tok_s / base[r.model]:.2f}× | "
            f"{fmt(r.bpc, '{:.3f}')} | {fmt(r.agreement, '{:.0%}')} | "
            f"{fmt(r.exit_fraction, '{:.0%}')} | {LLAMA_CPP_ANCHOR.get(r.model, '—')} |"
        )
    return "\n".join(lines) + "\n"


SPEEDUP_HEADER = "## Measured speed-up (decoder)"


def update_exit_report(rows: list[Row], machine: str, path: Path = OUT / "exits.md") -> None:
    """Replace the speed-up section of the calibration report with measured numbers."""
    if not path.exists():
        return
    text = path.read_text()
    head = text.split(SPEEDUP_HEADER)[0].rstrip()
    lines = [
        SPEEDUP_HEADER,
        "",
        f"Filled by `make bench-edge` on {machine}: the real `ExitDecoder` (int8 weights, "
        f"deferred KV), greedy, {NEW_TOKENS} new tokens × {len(PROMPTS)} prompts. Speed-up is "
        "against int8 at full depth (tau = 1.0) in the same run; the exit fraction is "
        "teacher-forced on held-out text; agreement is free-running greedy against bf16 "
        "full depth (fraction of tokens before the first divergence).",
        "",
        "| model | tau | exited | tok/s | speed-up | greedy agreement |",
        "|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r.model for r in rows):
        full = next(r for r in rows if r.model == model and r.variant == "tandem int8")
        lines.append(f"| {model} | 1.0 | 0% | {full.tok_s:.1f} | 1.00× | {full.agreement:.0%} |")
        for r in rows:
            if r.model == model and r.variant.startswith("tandem int8 + exit"):
                tau = r.variant.split("=")[1]
                lines.append(
                    f"| {model} | {tau} | {r.exit_fraction:.0%} | {r.tok_s:.1f} | "
                    f"{r.tok_s / full.tok_s:.2f}× | {r.agreement:.0%} |"
                )
    path.write_text(head + "\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in rows}, key=[r.model for r in rows].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        pts = [r for r in rows if r.model == m and r.bpc is not None]
        for r in pts:
            ax.scatter(r.tok_s, r.bpc)
            ax.annotate(r.variant.replace("tandem ", ""), (r.tok_s, r.bpc), fontsize=7)
        base = [r.tok_s for r in rows if r.model == m and r.variant == "transformers bf16"]
        if base:
            ax.axvline(base[0], ls="--", c="gray", label="transformers bf16")
        if m in LLAMA_CPP_ANCHOR:
            ax.axvline(LLAMA_CPP_ANCHOR[m], ls=":", c="red", label="llama.cpp (models.md)")
        ax.set_title(m)
        ax.set_xlabel("decode tok/s")
        ax.set_ylabel("bits/char (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2,gemma3,qwen05")
    p.add_argument("--texts", type=int, default=8, help="held-out texts per source")
    p.add_argument("--taus", default="0.9,0.8,0.6")
    p.add_argument("--render-only", action="store_true", help="rewrite the reports from edge.json")
    a = p.parse_args(argv)
    if a.render_only:
        data = json.loads((OUT / "edge.json").read_text())
        write_reports([Row(**r) for r in data["rows"]], data["machine"])
        return
    torch.set_num_threads(2)
    texts = [s.text for s in load_corpus("heldout", a.texts)]
    rows: list[Row] = []
    for m in a.models.split(","):
        rows.extend(bench_model(m, texts, tuple(float(t) for t in a.taus.split(","))))
        for r in rows[-9:]:
            print(r)
    write_reports(rows, f"{cpu_name()}, torch {torch.__version__}")


def write_reports(rows: list[Row], machine: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    md = render(rows, machine)
    (OUT / "edge.md").write_text(md)
    (OUT / "edge.json").write_text(
        json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    plot(rows, OUT / "edge.png")
    update_exit_report(rows, machine)
    print(md)


if __name__ == "__main__":
    main()
