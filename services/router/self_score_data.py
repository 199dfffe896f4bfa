"""Each expert's scores of the prompt itself (its "self-scores"), for every gate prompt.

A k > 1 request runs its k experts anyway, and each expert's prefill of the prompt yields,
at the cost of the language-model head over the prompt positions, how well that expert
predicts the prompt: its log-likelihood of the prompt tokens, and the entropy of its
next-token distributions (over the prompt, and at the last position, i.e. the first
generated token's distribution). ``services.router.self_score`` predicts from these which
expert continues the text best.

For every prompt of ``gate_data`` (the same items, in ``prompts.json`` of its jobs folder)
and every expert, loaded as the router serves it, `self_rows` runs the prompt alone and
records `SELF_FIELDS`. Two jobs per expert: ``self-<expert>`` scores every item as the edge
node prefills it (raw text: ``codec.encode(prompt)``; chat: the user message behind the
expert's chat template), ``selfraw-<expert>`` scores the chat items' user message as plain
text. What the edge node serves (edge.proto PromptScore) and what `assemble` returns by
default is the plain-text score of the gate text: raw prompts from the first job, chat items
from the second (the template's own tokens would otherwise dominate a short message's
score). Incremental like ``gate_data`` (one file per batch under ``jobs/<key>/``, resumable,
budgeted); run it with one thread at nice 19:
``nice -n 19 python -m services.router.self_score_data``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from services.router.gate_data import (
    BATCH,
    DEFAULT_PATH,
    SPLITS,
    GateSizes,
    JobCache,
    job_order,
    run_jobs,
)
from services.router.gate_prompts import GateItem
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.models.tokenizer import TextCodec
from tandem.runtime.engine_api import ChatMessage

# Per prompt and expert: prompt NLL (nats, over the prompt tokens after the first), the
# prompt's token count, mean entropy (nats) of the next-token distributions at the prompt
# positions that predict a prompt token, and the entropy and top-1 log-prob at the last
# prompt position (the distribution of the first generated token).
SELF_FIELDS: tuple[str, ...] = (
    "prompt_nll",
    "prompt_tokens",
    "mean_entropy",
    "last_entropy",
    "last_top1",
)
DEFAULT_OUT = DEFAULT_PATH.parent / "self_scores.npz"
EXPERTS: tuple[str, ...] = ("smollm2", "gemma3", "qwen05")


def prompt_ids(codec: TextCodec, item: GateItem, raw: bool = False) -> list[int]:
    """The prompt's tokens as the edge node serves the request; ``raw``: the gate text (the
    user message, for chat) as plain text, without the chat template (what the served
    self-scores are computed on)."""
    if raw:
        return codec.encode(item.gate_text)
    if item.chat:
        return codec.encode_chat([ChatMessage("user", item.prompt)])
    return codec.encode(item.prompt)


def self_scores_of_logits(ids: Sequence[int], logits: torch.Tensor) -> np.ndarray:
    """`SELF_FIELDS` from the logits at every prompt position ([k, V]) for prompt ``ids``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # [k]
    k = len(ids)
    nll = -float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()) if k > 1 else 0.0
    mean_ent = float(ent[:-1].mean()) if k > 1 else float(ent[-1])
    return np.array([nll, k, mean_ent, float(ent[-1]), float(logp[-1].max())])


@torch.inference_mode()
def self_rows(lm: LoadedModel, items: Sequence[GateItem], raw: bool = False) -> np.ndarray:
    """[P, len(SELF_FIELDS)] for ``items`` in one batch (``raw``: see `prompt_ids`)."""
    model = lm.model
    ids = [prompt_ids(lm.codec, it, raw) for it in items]
    batch = [(model.new_kv(), 0, model.embed(torch.tensor(i))) for i in ids]
    outs = model.run_rows(batch, 0, model.cfg.n_layers)
    return np.stack(
        [self_scores_of_logits(i, model.logits(h)) for h, i in zip(outs, ids, strict=True)]
    )


@torch.inference_mode()
def measure_cost(lm: LoadedModel, items: Sequence[GateItem], repeats: int = 3) -> dict:
    """What the self-scores add to a prefill, one prompt at a time: median seconds of a
    prefill with the head on the last position only (what generation needs) and with the
    head on every prompt position plus the scores (`self_scores_of_logits`)."""
    model = lm.model
    last, full = [], []
    for it in items:
        ids = prompt_ids(lm.codec, it)
        for _ in range(repeats):
            t0 = time.perf_counter()
            h = model.run_sequence(
                model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, model.cfg.n_layers
            )
            model.logits(h[-1:])
            t1 = time.perf_counter()
            h = model.run_sequence(
                model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, model.cfg.n_layers
            )
            self_scores_of_logits(ids, model.logits(h))
            t2 = time.perf_counter()
            last.append(t1 - t0)
            full.append(t2 - t1)
    return {
        "prompts": len(items),
        "prefill_last_s": float(np.median(last)),
        "prefill_scored_s": float(np.median(full)),
        "extra": float(np.median(full) / np.median(last) - 1.0),
        "vocab": int(model.lm_head.weight.shape[0]) if hasattr(model.lm_head, "weight") else None,
    }


def job_rows(lm: LoadedModel, items: Sequence[GateItem], raw_chat: bool) -> np.ndarray:
    """One batch of a job: ``raw_chat`` False, every item as served (chat behind the
    template); True, only the chat items, their user message as raw text (NaN elsewhere)."""
    if not raw_chat:
        return self_rows(lm, items)
    out = np.full((len(items), len(SELF_FIELDS)), np.nan)
    chat = [i for i, it in enumerate(items) if it.chat]
    if chat:
        out[chat] = self_rows(lm, [items[i] for i in chat], raw=True)
    return out


def jobs_folder(sizes: GateSizes, root: Path = DEFAULT_PATH.parent / "jobs") -> Path:
    """The gate_data jobs folder holding ``prompts.json`` for ``sizes`` (its key has the
    prompt count first, so it is found by the rest)."""
    tail = f"-{sizes.per_domain}-{sizes.prompt_chars}-{sizes.continuation_chars}"
    hits = sorted(p for p in root.glob(f"*{tail}") if (p / "prompts.json").exists())
    if not hits:
        raise FileNotFoundError(
            f"no gate_data jobs folder *{tail} under {root}: run make gate-data"
        )
    return hits[-1]


def load_items(folder: Path) -> list[GateItem]:
    return [GateItem(**d) for d in json.loads((folder / "prompts.json").read_text())]


def split_rows(items: Sequence[GateItem], values: np.ndarray) -> dict[str, np.ndarray]:
    """``values`` (item order) cut into gate_data's splits, row for row (gate_data keeps
    every prompt with features; all have them when its features job is complete)."""
    return {
        name: values[[j for j, i in enumerate(items) if i.split == corpus_split]]
        for name, corpus_split in SPLITS
    }


def assemble(
    experts: Sequence[str], sizes: GateSizes | None = None, raw_chat: bool = True
) -> tuple[list[GateItem], np.ndarray]:
    """The cached self-scores, without loading a model: (items, [P, N, F]) in item order,
    NaN where an expert has not scored a prompt yet. ``raw_chat`` (the served definition):
    chat items scored on the user message as raw text (`features.gate_text`), not behind
    the chat template."""
    folder = jobs_folder(sizes or GateSizes())
    items = load_items(folder)
    out = np.full((len(items), len(experts), len(SELF_FIELDS)), np.nan)
    chat = np.array([i.chat for i in items])
    for n, e in enumerate(experts):
        cache = JobCache(folder / f"self-{e}")
        if any(cache.root.glob("[0-9]*.npz")):
            out[:, n] = cache.collect(len(items), (len(SELF_FIELDS),))
        raw = JobCache(folder / f"selfraw-{e}")
        if raw_chat:
            got = (
                raw.collect(len(items), (len(SELF_FIELDS),))
                if any(raw.root.glob("[0-9]*.npz"))
                else np.full_like(out[:, n], np.nan)
            )
            out[chat, n] = got[chat]
    return items, out


def pooled_scores(
    experts: Sequence[str], prompts: Sequence[str], raw_chat: bool = True
) -> np.ndarray:
    """[P, N, F] aligned with `gate_lodo.pooled` of gate_data's splits (train, val, test
    concatenated), checked against its ``prompts``."""
    items, values = assemble(experts, raw_chat=raw_chat)
    parts = split_rows(items, values)
    texts = split_rows(items, np.array([i.prompt for i in items], dtype=object))
    order = [t for name, _ in SPLITS for t in texts[name]]
    if list(prompts) != order:
        raise ValueError("the self-scores' prompts do not match gate_data's rows")
    return np.concatenate([parts[name] for name, _ in SPLITS])


def load(path: Path = DEFAULT_OUT) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """(experts, {split: [P, N, F]}) as saved by `main`."""
    with np.load(path) as z:
        experts = tuple(str(e) for e in z["experts"])
        return experts, {name: z[f"{name}_self"] for name, _ in SPLITS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--experts", default=",".join(EXPERTS))
    ap.add_argument("--budget-s", type=float, default=3600.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--measure-cost", type=int, default=0, help="only time N prompts per expert (no scoring)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = tuple(args.experts.split(","))
    folder = jobs_folder(GateSizes())
    items = load_items(folder)
    order = job_order(len(items), GateSizes().seed)
    deadline = time.monotonic() + args.budget_s
    registry = ModelRegistry()
    if args.measure_cost:
        sample = [items[i] for i in order[: args.measure_cost]]
        cost = {}
        for e in experts:
            spec = registry.get(e)
            lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
            cost[e] = measure_cost(lm, sample)
            print(f"self-scores: cost {e}: {cost[e]}")
            del lm
        path = args.out.with_name("self_scores_cost.json")
        path.write_text(
            json.dumps({"threads": torch.get_num_threads(), "cost": cost}, indent=2) + "\n"
        )
        return
    timings: dict[str, dict[str, float]] = {}
    for e in experts:
        jobs = [
            (e, JobCache(folder / f"self-{e}"), False),
            (f"{e}-raw-chat", JobCache(folder / f"selfraw-{e}"), True),
        ]
        if time.monotonic() < deadline and not all(
            j.done(b) for _, j, _ in jobs for b in range(-(-len(items) // BATCH))
        ):
            spec = registry.get(e)
            t0 = time.perf_counter()
            lm = load_model(spec, LoadOptions(quant=spec.default_quant, exits=False))
            load_s = time.perf_counter() - t0
            stats = run_jobs(
                [(name, lambda b, lm=lm, r=raw: job_rows(lm, b, r), c) for name, c, raw in jobs],
                items,
                order,
                deadline,
                print,
            )
            timings[e] = {"load_s": load_s, **{k: v for k, v in stats.items()}}
            del lm
    items, values = assemble(experts)
    for n, e in enumerate(experts):
        print(f"self-scores: {e}: {int(np.isfinite(values[:, n, 0]).sum())} rows {timings.get(e)}")
    arrays = {f"{k}_self": v for k, v in split_rows(items, values).items()}
    np.savez(args.out, experts=np.array(experts), fields=np.array(SELF_FIELDS), **arrays)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "experts": experts,
                "fields": SELF_FIELDS,
                "timings": timings,
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"self-scores: wrote {args.out}")


if __name__ == "__main__":
    main()
