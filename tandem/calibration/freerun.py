"""`python -m tandem.calibration.freerun`: the served model's ExitDecoder, free-running
greedy on held-out instruction prompts, with exits at several tau against full depth.

Per tau: tokens/s of single-sequence decoding (tandem.runtime.generate, the same
quantization at every tau, tau 1.0 = full depth = the baseline, measured in the same
process, each prompt at every tau in turn), the fraction of tokens that exited (per exit
layer), and their agreement with full depth: each generated sequence is teacher-forced
once through the full model and an exited token agrees when it equals the full-depth
argmax at its own prefix. Also the fraction of answers identical to full-depth greedy.

`--split L` keeps only the heads at layers <= L: a token that no such head passes goes to
full depth, which is what the cloud answers in CE-CoLLM (the deferred KV makes the two
runs compute the same states), so its numbers are the collaborative edge's. `--heads`
keeps only the heads at the layers it names (a server can load fewer exits than trained).

`--engine compiled` (the default) decodes as a server does (static KV slots, the layer
ranges between the kept exits and the exit heads compiled and warmed up before timing;
`--eager-heads` keeps the heads eager); `--engine eager` is the reference path. Exits and
agreement are the same on both (a compiled head's confidence may differ from eager's in
the last bits, see tandem.runtime.compiled.CompiledDecode.head); tokens/s differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.data.instructions import TRAIN_POOL, load_instructions
from tandem.machine import cpu_name
from tandem.models.loader import LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.engine_api import ChatMessage
from tandem.runtime.exit_head import ExitHead
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams


@torch.inference_mode()
def full_depth_argmax(model, prompt: list[int], answer: list[int]) -> list[int]:
    """Full-depth argmax at each answer position (given the answer's own prefix)."""
    ids = prompt + answer[:-1]
    kv = model.new_kv()
    h = model.run_sequence(model.embed(torch.tensor(ids)), kv, 0, 0, model.cfg.n_layers)
    return model.logits(h[len(prompt) - 1 :]).argmax(-1).tolist()


@torch.inference_mode()
def head_cost_ms(
    heads: list[ExitHead],
    hidden_size: int,
    call: Callable[[ExitHead, torch.Tensor], torch.Tensor] | None = None,
    reps: int = 200,
) -> dict[str, float]:
    """ms per token of each head (one bf16 row, this process's thread count), called as
    `call(head, h)` does (e.g. `ExitDecoder.judge`: the head and the exit rule, compiled
    where the model decodes compiled), else the head alone, eager."""
    out = {}
    h = torch.randn(1, hidden_size, dtype=torch.bfloat16)
    call = call or (lambda head, x: head(x))
    for head in heads:
        for _ in range(10):
            call(head, h)
        t = time.perf_counter()
        for _ in range(reps):
            call(head, h)
        out[f"L{head.cfg.layer}"] = round((time.perf_counter() - t) / reps * 1e3, 3)
    return out


def run(args: argparse.Namespace) -> dict:
    spec = ModelRegistry().get(args.model)
    quant = args.quant or spec.default_quant
    compiled = args.engine == "compiled"
    lm = load_model(spec, LoadOptions(quant=quant, exits=True, compiled=compiled, kv_slots=2))
    heads = [
        h
        for h in lm.heads
        if (args.split is None or h.cfg.layer <= args.split)
        and (args.heads is None or h.cfg.layer in args.heads)
    ]
    dec = ExitDecoder(lm.model, heads)
    if compiled:
        lm.model.compiled.compile_heads = not args.eager_heads
        took = dec.warm_up(use_exits=True)
        print(f"[freerun {args.model}] compiled in {took:.0f} s", file=sys.stderr, flush=True)
    cost = head_cost_ms(heads, lm.model.cfg.hidden_size, lambda hd, x: dec.judge(hd, x, 0.9))
    print(f"[freerun {args.model}] head ms/token {cost}", file=sys.stderr, flush=True)
    train = frozenset(x.prompt for x in load_instructions("train", args.train_prompts))
    ins = load_instructions("heldout", args.prompts, args.seed, exclude=train)
    prompts = [lm.codec.encode_chat([ChatMessage(role="user", content=x.prompt)]) for x in ins]
    params = SamplingParams(max_tokens=args.max_new, temperature=0.0)
    generate(dec, prompts[0][:16], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    taus = [1.0, *args.taus] if args.taus else []
    # Each prompt runs at every tau, in an order rotated per prompt, so the host's drift
    # (its speed moves by several percent within minutes) weighs on every tau alike.
    gens: dict[float, list] = {tau: [None] * len(prompts) for tau in taus}
    secs = dict.fromkeys(taus, 0.0)
    for i, p in enumerate(prompts):
        for k in range(len(taus)):
            tau = taus[(i + k) % len(taus)]
            t = time.perf_counter()
            gens[tau][i] = generate(dec, p, params, tau, lm.codec.eos_ids)
            secs[tau] += time.perf_counter() - t
    rows = []
    for tau in taus:
        n_tok, n_exit, n_agree, same = 0, 0, 0, 0
        per_layer: dict[int, int] = {}
        for i, (p, g) in enumerate(zip(prompts, gens[tau], strict=True)):
            n_tok += len(g.token_ids)
            if tau == 1.0:
                continue
            same += g.token_ids == gens[1.0][i].token_ids
            exited = [j for j, e in enumerate(g.exit_layers) if e < lm.model.cfg.n_layers]
            if exited:
                ref = full_depth_argmax(lm.model, p, list(g.token_ids))
                n_agree += sum(g.token_ids[j] == ref[j] for j in exited)
            n_exit += len(exited)
            for j in exited:
                per_layer[g.exit_layers[j]] = per_layer.get(g.exit_layers[j], 0) + 1
        prefill_s = sum(g.prefill_s for g in gens[tau])
        row = {
            "tau": tau,
            "tokens": n_tok,
            "tok_per_s": round(n_tok / secs[tau], 2),
            # decode steps only: each prompt's first token comes from its prefill
            "decode_tok_per_s": round((n_tok - len(prompts)) / (secs[tau] - prefill_s), 2),
            "exited": round(n_exit / n_tok, 4) if tau < 1.0 else 0.0,
            "exited_agreement": round(n_agree / n_exit, 4) if n_exit else None,
            "by_layer": {str(k): round(v / n_tok, 4) for k, v in sorted(per_layer.items())},
            "identical_answers": round(same / len(prompts), 4) if tau < 1.0 else 1.0,
        }
        rows.append(row)
        print(f"[freerun {args.model}] {row}", file=sys.stderr, flush=True)
    base = rows[0]["tok_per_s"] if rows else 0.0
    base_decode = rows[0]["decode_tok_per_s"] if rows else 0.0
    for r in rows:
        r["speedup"] = round(r["tok_per_s"] / base, 3)
        r["decode_speedup"] = round(r["decode_tok_per_s"] / base_decode, 3)
    return {
        "model": args.model,
        "quant": quant,
        "split": args.split,
        "heads": [h.cfg.layer for h in heads],
        "engine": args.engine,
        "eager_heads": args.eager_heads,
        "machine": cpu_name(),
        "prompts": len(prompts),
        "max_new": args.max_new,
        "threads": args.threads,
        "head_ms": cost,
        "rows": rows,
    }


def report_key(args: argparse.Namespace) -> str:
    """Where a run goes in the report: "freerun" is the eager path with every head; each
    variant (split, a subset of heads, compiled, compiled with eager heads) has a key of
    its own."""
    key = "freerun" if args.split is None else f"freerun_split{args.split}"
    if args.heads is not None:
        key += "_heads" + "_".join(str(x) for x in sorted(args.heads))
    if args.engine == "compiled":
        key += "_compiled_eager_heads" if args.eager_heads else "_compiled"
    return key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.calibration.freerun")
    p.add_argument("--model", required=True)
    p.add_argument("--quant")
    p.add_argument("--split", type=int)
    p.add_argument("--heads", help="exit layers to keep, e.g. 18 (default: every head)")
    p.add_argument("--engine", choices=["compiled", "eager"], default="compiled")
    p.add_argument(
        "--eager-heads", action="store_true", help="compiled layers, eager exit heads (A/B)"
    )
    p.add_argument("--taus", default="0.8,0.9,0.95")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--train-prompts", type=int, default=TRAIN_POOL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", default="docs/bench/exits_sd.json")
    args = p.parse_args(argv)
    args.taus = [float(t) for t in args.taus.split(",") if t]
    args.heads = None if args.heads is None else {int(x) for x in args.heads.split(",") if x}
    torch.set_num_threads(args.threads)
    result = run(args)
    path = Path(args.report)
    blob = json.loads(path.read_text()) if path.exists() else {}
    entry = blob.setdefault("models", {}).setdefault(args.model, {})
    if result["rows"]:
        entry[report_key(args)] = result
    path.write_text(json.dumps(blob, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
