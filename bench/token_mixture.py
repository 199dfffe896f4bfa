"""`python -m bench.token_mixture`: quality of the served token mixture (qwen05 + qwen15,
one tokenizer) against top-1 routing and the sequence mixture, at their modelled cost.

Collect (cached in ``model_cache/gate/token_mix.npz``; one thread, resumable per model): on
a stratified sample of the gate prompts (every domain), both experts teacher-forced on the
reference continuation, as served (int4 via tandem.models.loader, chat items behind the
chat template): per continuation token, the log-probability of the reference token and the
model's top-K (ids, log-probabilities). The served mixture at every position is then
exactly what `services.router.token_mixture.mix` computes from the two ``next`` messages
(top-K of each, renormalised over their union; the reference token gets probability 0 from
an expert whose top-K misses it), evaluated on the reference token, for a weight w on qwen15:

    NLL_token = -sum_t log p_mix(y_t | y_<t)

Rows (bits per character of the reference continuation, lower is better): each expert
alone, top-1 by a per-prompt oracle, the sequence-level mixture with the same weights,
the token mixture with the whole vocabulary and with top-K, and the token mixture's
modelled energy (both experts run every token) next to top-1's (one expert).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from services.router.gate_data import token_rows
from services.router.gate_prompts import GateItem

PAIR = ("qwen05", "qwen15")
CACHE = Path("model_cache/gate/token_mix.npz")
JOBS = Path("model_cache/gate/jobs")
TOP_K = 64
LN2 = math.log(2)


def sample(items: list[GateItem], per_domain: int, seed: int = 0) -> list[GateItem]:
    rng = np.random.default_rng(seed)
    out = []
    for d in sorted({i.domain for i in items}):
        pool = [i for i in items if i.domain == d]
        out += [pool[j] for j in rng.permutation(len(pool))[:per_domain]]
    return out


@torch.inference_mode()
def collect_one(model_id: str, items: list[GateItem], k: int) -> dict[str, list[np.ndarray]]:
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry

    spec = ModelRegistry().get(model_id)
    lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
    model = lm.model
    ref, top_ids, top_lp, ids_out = [], [], [], []
    for it in items:
        ids, start = token_rows(lm.codec, it)
        h = model.run_sequence(
            model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, model.cfg.n_layers
        )
        logp = torch.log_softmax(model.logits(h[start - 1 : -1]).float(), dim=-1)
        target = torch.tensor(ids[start:])
        ref.append(logp.gather(1, target[:, None])[:, 0].numpy())
        v, i = logp.topk(k, dim=-1)
        top_ids.append(i.numpy().astype(np.int64))
        top_lp.append(v.numpy())
        ids_out.append(np.array(ids[start:]))
    return {"ref": ref, "top_ids": top_ids, "top_lp": top_lp, "ids": ids_out}


def token_mixture_nll(a: dict, b: dict, w_b: np.ndarray, k: int | None) -> np.ndarray:
    """Per prompt NLL (nats) of the reference under the token mixture with weight w_b on
    b: whole vocabulary (k None) or each expert's top-k renormalised over the union."""
    out = np.zeros(len(a["ref"]))
    for p in range(len(a["ref"])):
        wa, wb = math.log(1 - w_b[p]), math.log(w_b[p])
        if k is None:
            out[p] = -np.logaddexp(a["ref"][p] + wa, b["ref"][p] + wb).sum()
            continue
        total = 0.0
        for t, y in enumerate(a["ids"][p]):
            mass: dict[int, float] = {}
            for d, lw in ((a, wa), (b, wb)):
                for tok, lp in zip(d["top_ids"][p][t][:k], d["top_lp"][p][t][:k], strict=True):
                    mass[int(tok)] = mass.get(int(tok), 0.0) + math.exp(lp + lw)
            z = sum(mass.values())
            total += -math.log(max(mass.get(int(y), 0.0), 1e-30) / z)
        out[p] = total
    return out


def load_cache(path: Path) -> dict[str, dict[str, list[np.ndarray]]]:
    with np.load(path, allow_pickle=True) as z:
        return {
            m: {k: list(z[f"{m}_{k}"]) for k in ("ref", "top_ids", "top_lp", "ids")}
            for m in PAIR
            if f"{m}_ref" in z
        }


def chosen_rows(items: list[GateItem], chosen: list[GateItem]) -> np.ndarray:
    """Indices of the sampled items in the gate data's prompt list."""
    index = {id(i): j for j, i in enumerate(items)}
    return np.array([index[id(c)] for c in chosen])


def merge_into_jobs(prompts: Path, per_domain: int, cache: Path) -> int:
    """qwen15's sequence NLL on the sampled prompts (the sum of its per-token log-
    probabilities) as an extra batch of the gate data's qwen15 job, so gate-data has
    qwen15 on at least these prompts. Returns how many rows."""
    from services.router.gate_data import JobCache

    items = [GateItem(**x) for x in json.loads(prompts.read_text())]
    chosen = sample(items, per_domain)
    rows = chosen_rows(items, chosen)
    data = load_cache(cache)
    nll = np.array([-float(r.sum()) for r in data["qwen15"]["ref"]])
    JobCache(prompts.parent / "qwen15").put(900000, rows, nll)
    # Consistency with the gate-data scoring of qwen05 where both exist.
    q05 = JobCache(prompts.parent / "qwen05").collect(len(items), ())[rows]
    mine = np.array([-float(r.sum()) for r in data["qwen05"]["ref"]])
    ok = np.isfinite(q05)
    if ok.any():
        diff = np.abs(q05[ok] - mine[ok]).max()
        print(f"token-mix: qwen05 NLL vs gate-data: max |diff| {diff:.4f} nats, {ok.sum()} rows")
    return len(rows)


def report(prompts: Path, per_domain: int, cache: Path) -> tuple[list[str], dict]:
    """The served token mixture vs top-1 at modelled cost, leave-one-domain-out weights."""
    from bench.router import categories_of, expert_specs
    from services.router.gate import GateConfig, masked_log_weights, train_gate
    from services.router.gate_data import GateData, JobCache
    from services.router.selection import SelectionProblem

    items = [GateItem(**x) for x in json.loads(prompts.read_text())]
    chosen = sample(items, per_domain)
    rows = chosen_rows(items, chosen)
    data = load_cache(cache)
    a, b = data["qwen05"], data["qwen15"]
    feats = JobCache(prompts.parent / "features").collect(len(items))[rows]
    chars = np.array([len(c.continuation) for c in chosen], dtype=float)
    doms = np.array([c.domain for c in chosen])
    seq = np.stack([[-float(r.sum()) for r in a["ref"]], [-float(r.sum()) for r in b["ref"]]], 1)
    w_b = np.zeros(len(chosen))
    prior = np.zeros(len(chosen), dtype=int)
    for d in sorted(set(doms)):
        test, train = doms == d, doms != d
        g = GateData(PAIR, feats[train], seq[train], chars[train].astype(int), tuple(doms[train]))
        gate = train_gate(g, None, 0, GateConfig())
        with torch.no_grad():
            lw = masked_log_weights(
                gate(torch.as_tensor(feats[test])).double(), torch.ones(2, dtype=bool)
            )
        w_b[test] = lw.exp()[:, 1].numpy()
        prior[test] = int((seq[train].sum(0)).argmin())
    w_b = np.clip(w_b, 1e-6, 1 - 1e-6)
    total = chars.sum() * LN2
    ar = np.arange(len(chosen))
    top1 = np.where(w_b > 0.5, 1, 0)
    seq_mix = -np.logaddexp(-seq[:, 0] + np.log(1 - w_b), -seq[:, 1] + np.log(w_b))
    tok_full = token_mixture_nll(a, b, w_b, None)
    covered = coverage(a, b, TOP_K)
    tok_half = token_mixture_nll(a, b, np.full(len(chosen), 0.5), None)
    problem = SelectionProblem.from_specs(
        expert_specs(PAIR),
        categories_of(GateData(PAIR, feats, seq, chars.astype(int), tuple(doms))),
        t_agg_s=0.0,
    )
    e05, e15 = problem.energy_j
    rows_out = [
        ("qwen05 alone", seq[:, 0].sum(), e05),
        ("qwen15 alone", seq[:, 1].sum(), e15),
        (
            "prior (best single on training domains)",
            seq[ar, prior].sum(),
            float(np.where(prior == 1, e15, e05).mean()),
        ),
        (
            "softmax top-1 (served at k=1; = k=2 plurality vote)",
            seq[ar, top1].sum(),
            float(np.where(top1 == 1, e15, e05).mean()),
        ),
        ("sequence mixture (not served)", seq_mix.sum(), e05 + e15),
        ("**token mixture, served (whole vocabulary on the wire)**", tok_full.sum(), e05 + e15),
        ("token mixture, equal weights", tok_half.sum(), e05 + e15),
        (
            "oracle (best expert per prompt)",
            seq.min(1).sum(),
            float(np.where(seq[:, 1] < seq[:, 0], e15, e05).mean()),
        ),
    ]
    base = seq[ar, top1].sum()
    lines = [
        "| qwen05 + qwen15 (one tokenizer) | bits/char | vs softmax top-1 | modelled J / request |",
        "|---|---|---|---|",
    ]
    summary = {}
    for name, nll, j in rows_out:
        lines.append(f"| {name} | {nll / total:.3f} | {(nll - base) / base:+.1%} | {j:.1f} |")
        summary[name] = {"bpc": float(nll / total), "energy_j": float(j)}
    lines += [
        "",
        f"With top-{TOP_K} per expert on the wire (the `TokenMixer` default, ~0.5 KB per "
        "expert and token instead of the whole 151,936-entry vocabulary), the reference token "
        f"is inside the union of the two top-{TOP_K} lists at {covered:.1%} of positions; the "
        "truncated mixture gives every other token probability 0 (sampling never picks it), "
        "so a teacher-forced bits/char of the truncated mixture is not finite and is not "
        "reported; the whole-vocabulary row is the exact served mixture (`top_k=0`).",
    ]
    return lines, {
        "prompts": len(chosen),
        "rows": summary,
        "mean_w_qwen15": float(w_b.mean()),
        f"top{TOP_K}_coverage": covered,
    }


def coverage(a: dict, b: dict, k: int) -> float:
    """Share of reference tokens inside the union of the two experts' top-k lists."""
    hit = total = 0
    for p in range(len(a["ref"])):
        for t, y in enumerate(a["ids"][p]):
            total += 1
            hit += int(y in set(a["top_ids"][p][t][:k]) | set(b["top_ids"][p][t][:k]))
    return hit / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-domain", type=int, default=20)
    ap.add_argument(
        "--prompts", type=Path, default=None, help="gate-data prompts.json (default: newest)"
    )
    ap.add_argument("--collect", action="store_true", help="run the models (slow)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--merge", action="store_true", help="add qwen15's NLL to gate-data's jobs")
    args = ap.parse_args(argv)
    if args.prompts is None:
        found = sorted(JOBS.glob("*/prompts.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit("no gate-data prompts; run `make gate-data` first")
        args.prompts = found[-1]
    items = [GateItem(**x) for x in json.loads(args.prompts.read_text())]
    chosen = sample(items, args.per_domain)
    if args.collect:
        torch.set_num_threads(1)
        blob = dict(np.load(args.cache, allow_pickle=True)) if args.cache.exists() else {}
        for m in PAIR:
            if f"{m}_ref" in blob:
                continue
            t0 = time.perf_counter()
            got = collect_one(m, chosen, TOP_K)
            for key, arrs in got.items():
                blob[f"{m}_{key}"] = np.array(arrs, dtype=object)
            blob[f"{m}_seconds"] = np.array(time.perf_counter() - t0)
            np.savez(args.cache, **blob)
            print(f"token-mix: {m} {len(chosen)} prompts in {time.perf_counter() - t0:.0f}s")
        args.merge = True  # qwen15's NLL on these prompts goes into gate-data
    if args.merge:
        n = merge_into_jobs(args.prompts, args.per_domain, args.cache)
        print(f"token-mix: merged qwen15 on {n} prompts")
        return {}
    lines, summary = report(args.prompts, args.per_domain, args.cache)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
