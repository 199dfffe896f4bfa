"""`python -m tandem.calibration`: train, save and evaluate early-exit heads per model.

For each model, one at a time (only one model is in memory):
  1. collect teacher data on the `train` corpus split (collect.py),
  2. distil one head per exit layer (train.py) and save `<out>/<model>.pt` with `save_heads`,
  3. reload the artifact as the server would (`load_heads`, model dtype) and evaluate it
     teacher-forced on the `heldout` split; merge the results into `<report>/exits.{json,md}`.

Everything is seeded; the artifact (weights + metadata, no dates or timings) is reproducible
on the same machine and thread count. Timings go to the report only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

from tandem.calibration.collect import (
    DEFAULT_SHORTLIST,
    MAX_LEN,
    adds_bos,
    choose_shortlist,
    collect_activations,
    encode_corpus,
    eos_ids_of,
    shortlist_targets,
)
from tandem.calibration.evaluate import evaluate_heads, write_report
from tandem.calibration.train import TrainConfig, make_head, split_by_text, train_head
from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelRegistry
from tandem.runtime.exit_head import load_heads, save_heads
from tandem.runtime.model import DecoderModel

# Teacher tokens per model: sized so collection takes a couple of minutes on 2 CPU cores.
TRAIN_TOKENS = {"smollm2": 24_000, "gemma3": 24_000, "qwen05": 16_000, "qwen15": 8_000}
EVAL_TOKENS = {"smollm2": 6_000, "gemma3": 6_000, "qwen05": 4_000, "qwen15": 3_000}
DEFAULT_TRAIN_TOKENS, DEFAULT_EVAL_TOKENS = 8_000, 3_000
# Adapter rank 256, except where three bf16 heads would pass MAX_ARTIFACT_BYTES
# (qwen15, d = 1536: 4.8 MB at rank 256, 3.6 MB at 192).
RANKS = {"qwen15": 192}
MAX_ARTIFACT_BYTES = 4_000_000
ARTIFACT_FORMAT = 1


def _per_model(text: str | None, kind=int) -> dict:
    """Parse "a=1,b=2" into {"a": 1, "b": 2}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = kind(value)
    return out


def calibrate_model(model_id: str, args: argparse.Namespace) -> None:
    log = f"[calibrate {model_id}]"
    spec = ModelRegistry().get(model_id)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    path = ensure_converted(spec, Path(args.model_cache))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = DecoderModel.load(path, torch.bfloat16)
    cfg = model.cfg
    timing["load"] = time.perf_counter() - t0

    # 1. teacher data
    t = time.perf_counter()
    n_train = _per_model(args.tokens).get(
        model_id, TRAIN_TOKENS.get(model_id, DEFAULT_TRAIN_TOKENS)
    )
    seqs = encode_corpus(tok, cfg.bos_id, "train", n_train, args.seed, MAX_LEN)
    acts = collect_activations(model, seqs, spec.exit_layers, log_prefix=f"{log} collect")
    shortlist = choose_shortlist(acts, args.shortlist, eos_ids_of(model, tok))
    targets = shortlist_targets(model, acts, shortlist)
    coverage = float(torch.isin(acts.final_argmax, shortlist).float().mean())
    timing["collect"] = time.perf_counter() - t
    print(f"{log} {acts.n_tokens} tokens, shortlist coverage {coverage:.4f}", file=sys.stderr)

    # 2. heads
    t = time.perf_counter()
    rank = {**RANKS, **_per_model(args.rank_per_model)}.get(model_id, args.rank)
    tcfg = TrainConfig(rank=rank, lr=args.lr, max_epochs=args.epochs, seed=args.seed)
    train_rows, val_rows = split_by_text(acts.text_index, tcfg.val_fraction, tcfg.seed)
    heads, head_stats = [], []
    for layer, hidden in zip(spec.exit_layers, acts.hidden, strict=True):
        torch.manual_seed(args.seed * 1000 + layer)
        head = make_head(model, layer, shortlist, rank)
        stats = train_head(
            head, hidden, targets, train_rows, val_rows, tcfg, log_prefix=f"{log} L{layer}"
        )
        heads.append(head)
        head_stats.append(stats)
    timing["train"] = time.perf_counter() - t
    train_info = {
        "split": "train",
        "tokens": acts.n_tokens,
        "texts": acts.n_texts,
        "train_tokens": int(train_rows.shape[0]),
        "val_tokens": int(val_rows.shape[0]),
        "shortlist_coverage": round(coverage, 4),
        "heads": head_stats,
    }
    del acts, targets, hidden
    gc.collect()

    meta = {
        "format": ARTIFACT_FORMAT,
        "model": model_id,
        "upstream": spec.upstream,
        "n_layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "exit_layers": list(spec.exit_layers),
        "shortlist_size": int(shortlist.shape[0]),
        "rank": rank,
        "seed": args.seed,
        "corpus_split": "train",
        "max_len": MAX_LEN,
        "bos": adds_bos(tok, cfg.bos_id),
        "stored_dtype": "bfloat16",
        "train_config": tcfg.to_dict(),
        "train": train_info,
    }
    out = Path(args.out) / f"{model_id}.pt"
    # Stored in the serving dtype (bf16): halves the artifact; heads run in bf16 anyway.
    save_heads([copy.deepcopy(h).to(torch.bfloat16) for h in heads], out, meta)
    size = out.stat().st_size
    print(f"{log} wrote {out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    if size > MAX_ARTIFACT_BYTES:
        print(f"{log} WARNING: artifact over {MAX_ARTIFACT_BYTES / 1e6:.0f} MB", file=sys.stderr)
    del heads
    if args.skip_eval:
        return

    # 3. evaluation of the artifact as served
    t = time.perf_counter()
    served, _ = load_heads(
        out, model.lm_head.weight, cfg.rms_eps, cfg.norm_unit_offset, model.dtype
    )
    n_eval = _per_model(args.eval_tokens).get(
        model_id, EVAL_TOKENS.get(model_id, DEFAULT_EVAL_TOKENS)
    )
    eval_seqs = encode_corpus(tok, cfg.bos_id, "heldout", n_eval, args.seed, MAX_LEN)
    eval_acts = collect_activations(model, eval_seqs, spec.exit_layers, log_prefix=f"{log} eval")
    result = evaluate_heads(model, served, eval_acts)
    result["split"] = "heldout"
    timing["eval"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    for ex in result["exits"]:
        print(
            f"{log} L{ex['layer']}: head top-1 {ex['head_top1']:.4f} "
            f"vs logit lens {ex['lens_top1']:.4f}",
            file=sys.stderr,
        )
    entry = {
        "upstream": spec.upstream,
        "n_layers": cfg.n_layers,
        "exit_layers": list(spec.exit_layers),
        "shortlist_size": int(shortlist.shape[0]),
        "rank": rank,
        "artifact": {"path": str(out), "bytes": size},
        "train": train_info,
        "eval": result,
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
    }
    write_report(Path(args.report), model_id, entry)
    print(f"{log} done in {timing['total']:.0f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.calibration", description=__doc__)
    p.add_argument("--models", default="smollm2,gemma3,qwen05,qwen15")
    p.add_argument("--out", default="artifacts/exits", help="artifact directory")
    p.add_argument("--report", default="docs/bench", help="where exits.md / exits.json go")
    p.add_argument("--model-cache", default="model_cache")
    p.add_argument("--tokens", help="train tokens per model, e.g. smollm2=24000,qwen15=8000")
    p.add_argument("--eval-tokens", help="held-out tokens per model, same format")
    p.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST)
    p.add_argument("--rank", type=int, default=256, help="adapter rank (see RANKS)")
    p.add_argument("--rank-per-model", help="adapter rank overrides, e.g. qwen15=128")
    p.add_argument("--epochs", type=int, default=TrainConfig.max_epochs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-eval", action="store_true", help="train and save only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = ModelRegistry()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        registry.get(m)  # fail fast on an unknown id
    for m in models:
        calibrate_model(m, args)
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
