"""`python -m tandem.calibration.sd_heads`: train calibrated exit heads on self-distillation
features (tandem.calibration.selfdistill) and evaluate them offline on held-out prompts.

Input: `<data>/<model>.train.pt` (and `<model>.heldout.pt` for the evaluation), written by
`python -m tandem.calibration.selfdistill --model <id> [--split heldout]`.
Output: `<out>/<model>.pt` (bf16, a few MB) and `<report>/exits_sd.json`.

Offline evaluation = the heads on the held-out prompts' full-depth greedy trajectories
(the answer rows): reliability of the calibrated confidence, and the exit cascade of
`ExitDecoder` (first exit whose verdict passes tau) per tau, for all exits and for the
exits up to the split layer (CE-CoLLM's edge). The decoder's own free-running numbers and
speed come from tandem.calibration.freerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from tandem.calibration.consistency import (
    calibrated_copy,
    choose_shortlist,
    fit_consistency,
    soft_targets,
    split_extended,
)
from tandem.calibration.extend import extras_dir, list_parts, load_with_extras
from tandem.calibration.freerun import head_cost_ms
from tandem.calibration.selfdistill import Features
from tandem.calibration.train import TrainConfig, make_head, train_head
from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelRegistry
from tandem.runtime.exit_head import ExitHead, decide, load_heads, save_heads
from tandem.runtime.model import DecoderModel
from tandem.runtime.quant import quantize_model

ARTIFACT_FORMAT = 2
BINS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0001)
TAUS = (0.8, 0.9, 0.95, 0.98)
SPLITS = {"qwen15": 14, "smollm2": 15}


def _pct(x: float) -> float:
    return round(float(x), 4)


@torch.no_grad()
def evaluate(heads: list[ExitHead], feats: Features, split: int | None) -> dict:
    rows = feats.is_answer.nonzero().squeeze(1)
    ref = feats.final_argmax[rows]
    verdicts = []
    out: dict = {"answer_rows": int(rows.shape[0]), "exits": []}
    for head, hidden in zip(heads, feats.hidden, strict=True):
        h = hidden[rows]
        dtype = head.norm_out.weight.dtype
        logits = torch.cat([head(x.to(dtype)) for x in h.split(2048)])
        d = decide(logits, head.shortlist, 0.0)
        is_tok = logits.argmax(-1) < head.shortlist.shape[0]
        agree = d.token == ref
        verdicts.append((d.prob, is_tok, agree))
        table = []
        for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
            m = is_tok & (d.prob >= lo) & (d.prob < hi)
            n = int(m.sum())
            table.append(
                {
                    "bin": f"{lo:.2f}-{min(hi, 1.0):.2f}",
                    "count": n,
                    "mean_confidence": _pct(d.prob[m].mean()) if n else None,
                    "agreement": _pct(agree[m].float().mean()) if n else None,
                }
            )
        out["exits"].append(
            {
                "layer": head.cfg.layer,
                "top1": _pct((agree & is_tok).float().mean()),
                "coverage": _pct(torch.isin(ref, head.shortlist).float().mean()),
                "reliability": table,
            }
        )

    def cascade(upto: int | None) -> list[dict]:
        res = []
        for tau in TAUS:
            done = torch.zeros(rows.shape[0], dtype=torch.bool)
            good = torch.zeros_like(done)
            per = []
            for head, (p, is_tok, agree) in zip(heads, verdicts, strict=True):
                if upto is not None and head.cfg.layer > upto:
                    break
                take = is_tok & (p >= tau) & ~done
                per.append(_pct(take.float().mean()))
                good |= take & agree
                done |= take
            n = int(done.sum())
            res.append(
                {
                    "tau": tau,
                    "exit_fraction": per,
                    "exited": _pct(done.float().mean()),
                    "exited_agreement": _pct(good.sum() / n) if n else None,
                }
            )
        return res

    out["cascade"] = cascade(None)
    if split is not None:
        out["split"] = split
        out["cascade_split"] = cascade(split)
    return out


def with_kept_heads(
    path: Path, heads: list[ExitHead], meta: dict, model: DecoderModel
) -> list[ExitHead]:
    """`heads` (bf16) and the heads of the artifact at `path` at other layers, by layer;
    `meta` (the new artifact's) gets their configs and data size and every exit layer."""
    cfg = model.cfg
    old, old_meta = load_heads(
        path, model.lm_head.weight, cfg.rms_eps, cfg.norm_unit_offset, torch.float32
    )
    layers = {h.cfg.layer for h in heads}
    kept = [h.to(torch.bfloat16) for h in old if h.cfg.layer not in layers]
    meta["kept_heads"] = [
        {**vars(h.cfg), "rows": old_meta.get("rows"), "base_prompts": old_meta.get("base_prompts")}
        for h in kept
    ]
    meta["exit_layers"] = sorted([*layers, *(h.cfg.layer for h in kept)])
    return sorted([*heads, *kept], key=lambda h: h.cfg.layer)


def run(model_id: str, args: argparse.Namespace) -> dict:
    log = f"[sd_heads {model_id}]"
    spec = ModelRegistry().get(model_id)
    t0 = time.perf_counter()
    path = ensure_converted(spec, Path(args.model_cache))
    model = DecoderModel.load(path, torch.bfloat16)
    cfg = model.cfg
    data = Path(args.data)
    base = data / f"{model_id}.train.pt"
    # the base cache plus its extension parts (tandem.calibration.extend), if any
    feats, base_prompts = load_with_extras(base, args.max_parts)
    n_parts = len(list_parts(extras_dir(base))) if extras_dir(base).exists() else 0
    n_parts = n_parts if args.max_parts is None else min(n_parts, args.max_parts)
    if args.layers:  # a subset of the exits (e.g. to compare ranks / shortlists on one)
        keep = [int(x) for x in args.layers.split(",")]
        idx = [feats.layers.index(x) for x in keep]
        feats = Features(
            tuple(keep),
            [feats.hidden[i] for i in idx],
            feats.top_ids,
            feats.top_p,
            feats.is_answer,
            feats.seq_index,
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    eos = [*cfg.eos_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])]
    shortlist = choose_shortlist(feats, args.shortlist, cfg.vocab_size, eos)
    targets = soft_targets(feats, shortlist, cfg.vocab_size)
    # base prompts: 80% fit the adapters, 10% early stopping + the consistency classifier,
    # 10% untouched (reliability tables on prompts no part of the head has seen); prompts
    # of the extension: 90/10 (the test prompts stay the base cache's, so results compare)
    train_rows, val_rows, test_rows = split_extended(
        feats.seq_index, base_prompts, (0.1, 0.1), (0.1, 0.0), args.seed
    )
    rank = args.rank
    tcfg = TrainConfig(rank=rank, lr=args.lr, max_epochs=args.epochs, seed=args.seed)
    heads, stats = [], []
    for layer, hidden in zip(feats.layers, feats.hidden, strict=True):
        t = time.perf_counter()
        torch.manual_seed(args.seed * 1000 + layer)
        head = make_head(model, layer, shortlist, rank)
        s = train_head(head, hidden, targets, train_rows, val_rows, tcfg, f"{log} L{layer}")
        calib = calibrated_copy(head)
        s["consistency"] = fit_consistency(calib, hidden[val_rows], feats.final_argmax[val_rows])
        s["train_s"] = round(time.perf_counter() - t, 1)
        print(f"{log} L{layer}: {s}", file=sys.stderr, flush=True)
        heads.append(calib)
        stats.append(s)
    train_s = time.perf_counter() - t0
    meta = {
        "format": ARTIFACT_FORMAT,
        "model": model_id,
        "upstream": spec.upstream,
        "n_layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "exit_layers": list(feats.layers),
        "shortlist_size": int(shortlist.shape[0]),
        "rank": rank,
        "seed": args.seed,
        "data": "self-distillation: greedy answers to chat prompts from the train split",
        "base_prompts": base_prompts,
        "extra_parts": n_parts,
        "rows": feats.n,
        "answer_rows": int(feats.is_answer.sum()),
        "stored_dtype": "bfloat16",
        "calibrated": True,
        "train_config": tcfg.to_dict(),
    }
    out = Path(args.out) / f"{model_id}.pt"
    saved = [copy.deepcopy(h).to(torch.bfloat16) for h in heads]
    if args.replace and out.exists():
        saved = with_kept_heads(out, saved, meta, model)
    save_heads(saved, out, meta)
    size = out.stat().st_size
    print(f"{log} wrote {out} ({size / 1e6:.2f} MB) in {train_s:.0f} s", file=sys.stderr)
    entry = {
        "upstream": spec.upstream,
        "artifact": {"path": str(out), "bytes": size},
        "train": {
            "rows": feats.n,
            "answer_rows": int(feats.is_answer.sum()),
            "prompts": int(feats.seq_index.max()) + 1,
            "base_prompts": base_prompts,
            "extra_parts": n_parts,
            "train_rows": int(train_rows.shape[0]),
            "val_rows": int(val_rows.shape[0]),
            "test_rows": int(test_rows.shape[0]),
            "coverage_train": _pct(torch.isin(feats.final_argmax, shortlist).float().mean()),
            "heads": stats,
            "train_s": round(train_s, 1),
        },
        "shortlist_size": int(shortlist.shape[0]),
        "rank": rank,
        "kept_heads": meta.get("kept_heads", []),  # heads of the artifact not trained here
    }
    served, _ = load_heads(
        out, model.lm_head.weight, cfg.rms_eps, cfg.norm_unit_offset, torch.bfloat16
    )
    served = [h for h in served if h.cfg.layer in feats.layers]  # the heads trained here
    for h in served:  # as the loader serves them
        quantize_model(h, spec.default_quant, skip=("other", "down", "up"))
    entry["head_ms"] = head_cost_ms(served, cfg.hidden_size)
    print(f"{log} head ms/token {entry['head_ms']}", file=sys.stderr, flush=True)
    test = feats.rows(test_rows)
    del feats, targets
    evals = {"eval": test}
    ev_path = data / f"{model_id}.heldout.pt"
    if ev_path.exists():
        evals["eval_heldout"] = Features.load(ev_path)
    for key, ev in evals.items():
        entry[key] = evaluate(served, ev, SPLITS.get(model_id))
        entry[key]["quant"] = spec.default_quant
        entry[key]["prompts"] = int(ev.seq_index.unique().numel())
        for c in entry[key]["cascade"]:
            print(f"{log} {key} {c}", file=sys.stderr)
        for c in entry[key].get("cascade_split", []):
            print(f"{log} {key} split {c}", file=sys.stderr)
    report = Path(args.report) / "exits_sd.json"
    blob = json.loads(report.read_text()) if report.exists() else {}
    blob.setdefault("models", {})[model_id] = {**blob.get("models", {}).get(model_id, {}), **entry}
    report.write_text(json.dumps(blob, indent=1) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.calibration.sd_heads")
    p.add_argument("--models", default="qwen05,qwen15")
    p.add_argument("--data", default=".cache/exits")
    p.add_argument("--out", default="artifacts/exits")
    p.add_argument("--report", default="docs/bench")
    p.add_argument("--model-cache", default="model_cache")
    p.add_argument("--shortlist", type=int, default=4096)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", help="train only these exits, e.g. 14 (default: all)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --layers: replace those heads in the existing artifact, keep its others",
    )
    p.add_argument(
        "--max-parts", type=int, help="use at most this many extension parts (default: all)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for m in args.models.split(","):
        run(m.strip(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
