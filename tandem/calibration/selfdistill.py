"""Self-distillation data for exit heads: a model's own greedy answers to chat prompts.

Batched greedy decoding at full depth over chat-formatted instruction prompts
(tandem.data.instructions). One pass yields the training rows:

- *prompt rows* (teacher-forced, prefill speed): every prompt position >= 1;
- *answer rows* (free-running, decode speed): every generated position, i.e. exactly the
  states a served greedy request goes through at full depth.

Per row we keep the hidden state after each requested exit layer (bf16, the only large
part) and the final layer's top-`TOP_K` token ids and probabilities (the full softmax's, so
the top-1 is the greedy token and the remaining mass is 1 - their sum). No [N, vocab] tensor
is ever stored.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.runtime.kv_slots import SlotKV
from tandem.runtime.model import DecoderModel

TOP_K = 8
PREFILL_TOKENS = 4096  # prompt rows per prefill forward


@dataclass
class Features:
    layers: tuple[int, ...]
    hidden: list[torch.Tensor]  # per layer [N, d] bf16
    top_ids: torch.Tensor  # [N, TOP_K] long, final-layer top tokens, best first
    top_p: torch.Tensor  # [N, TOP_K] fp32, their full-softmax probabilities
    is_answer: torch.Tensor  # [N] bool: generated (free-running) row, else a prompt row
    seq_index: torch.Tensor  # [N] long: which prompt the row belongs to

    @property
    def n(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def final_argmax(self) -> torch.Tensor:
        return self.top_ids[:, 0]

    def rows(self, idx: torch.Tensor) -> Features:
        return Features(
            self.layers,
            [h[idx] for h in self.hidden],
            self.top_ids[idx],
            self.top_p[idx],
            self.is_answer[idx],
            self.seq_index[idx],
        )

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        return Features(
            parts[0].layers,
            [torch.cat([p.hidden[j] for p in parts]) for j in range(len(parts[0].layers))],
            torch.cat([p.top_ids for p in parts]),
            torch.cat([p.top_p for p in parts]),
            torch.cat([p.is_answer for p in parts]),
            torch.cat([p.seq_index for p in parts]),
        )

    def save(self, path) -> None:
        torch.save(vars(self), path)

    @staticmethod
    def load(path) -> Features:
        return Features(**torch.load(path, map_location="cpu", weights_only=False))


def _top(model: DecoderModel, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, ps = [], []
    chunk = max(16, (1 << 26) // model.cfg.vocab_size)
    for rows in h.split(chunk):
        logits = model.logits(rows).float()
        p, i = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
        ids.append(i)
        ps.append(p)
    return torch.cat(ids), torch.cat(ps)


@torch.inference_mode()
def run_batch(
    model: DecoderModel,
    prompts: Sequence[list[int]],
    layers: Sequence[int],
    max_new: int,
    eos_ids: frozenset[int],
    first_index: int = 0,
) -> tuple[Features, list[list[int]]]:
    """Greedy answers of `prompts` (decoded together) and their rows' features. On a
    compiled model (`load_for_collection`) each sequence decodes in a static slot through
    the graphs of the ranges between `layers`, with the same arithmetic as eager."""
    bounds = [*layers, model.cfg.n_layers]
    kvs = [model.new_kv() for _ in prompts]
    parts: list[Features] = []

    def record(hs: list[torch.Tensor], final: torch.Tensor, answer: bool, owners: list[int]):
        ids, ps = _top(model, final)
        parts.append(
            Features(
                tuple(layers),
                [h.to(torch.bfloat16) for h in hs],
                ids,
                ps,
                torch.full((final.shape[0],), answer),
                torch.tensor(owners, dtype=torch.long),
            )
        )
        return ids[:, 0]

    # prefill (teacher-forced prompt rows); position 0 is never a decode position
    rows = [(kv, 0, model.embed(torch.tensor(p))) for kv, p in zip(kvs, prompts, strict=True)]
    outs = [h for _, _, h in rows]
    hs_per_seq: list[list[torch.Tensor]] = [[] for _ in prompts]
    start = 0
    for end in bounds:
        outs = model.run_rows([(kv, 0, h) for kv, h in zip(kvs, outs, strict=True)], start, end)
        if end != model.cfg.n_layers:
            for j, h in enumerate(outs):
                hs_per_seq[j].append(h[1:])
        start = end
    owners = [first_index + j for j, p in enumerate(prompts) for _ in range(len(p) - 1)]
    record(
        [torch.cat([hs_per_seq[j][k] for j in range(len(prompts))]) for k in range(len(layers))],
        torch.cat([h[1:] for h in outs]),
        False,
        owners,
    )
    nxt = torch.cat([_top(model, h[-1:])[0][:, 0] for h in outs]).tolist()
    answers: list[list[int]] = [[t] for t in nxt]
    lengths = [len(p) for p in prompts]
    active = [j for j, t in enumerate(nxt) if t not in eos_ids and max_new > 1]
    while active:
        h = model.embed(torch.tensor([answers[j][-1] for j in active]))
        hs = []
        start = 0
        for end in bounds:
            out = model.run_rows(
                [(kvs[j], lengths[j], h[i : i + 1]) for i, j in enumerate(active)], start, end
            )
            h = torch.cat(out)
            if end != model.cfg.n_layers:
                hs.append(h)
            start = end
        toks = record(hs, h, True, [first_index + j for j in active]).tolist()
        still = []
        for j, t in zip(active, toks, strict=True):
            lengths[j] += 1
            answers[j].append(t)
            if t not in eos_ids and len(answers[j]) < max_new:
                still.append(j)
        active = still
    for kv in kvs:  # give compiled slots back now, not when collected (as warm_up does)
        if isinstance(kv, SlotKV):
            kv.release()
    return Features.cat(parts), answers


def collect(
    model: DecoderModel,
    prompts: Sequence[list[int]],
    layers: Sequence[int],
    max_new: int,
    eos_ids: frozenset[int],
    batch: int,
    log_prefix: str | None = None,
    deadline: float | None = None,
) -> tuple[Features, list[list[int]]]:
    """`run_batch` over `prompts` in groups of `batch`, in order. Stops early (after a
    whole group) when `deadline` (time.monotonic) has passed."""
    parts, answers = [], []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        if deadline is not None and time.monotonic() > deadline:
            break
        f, a = run_batch(model, prompts[s : s + batch], layers, max_new, eos_ids, s)
        parts.append(f)
        answers.extend(a)
        if log_prefix is not None:
            n = sum(p.n for p in parts)
            n_ans = sum(int(p.is_answer.sum()) for p in parts)
            dt = time.perf_counter() - t0
            print(
                f"{log_prefix} {len(answers)}/{len(prompts)} prompts, {n} rows "
                f"({n_ans} answer), {dt:.0f} s, {n_ans / dt:.1f} answer tok/s",
                file=sys.stderr,
                flush=True,
            )
    return Features.cat(parts), answers


def load_for_collection(model_id: str, quant: str | None, engine: str, batch: int):
    """The model to collect with (`quant` None: its serving quantization), compiled
    (`engine` "compiled": a static KV slot per sequence of a batch, the graphs of the layer
    ranges between the exits warmed up) or the eager reference. Both record the same rows; on
    the AVX2 host the compiled one took 19 s where eager took 26 s (qwen05, 16 prompts)."""
    from tandem.models.loader import LoadOptions, load_model
    from tandem.models.registry import ModelRegistry
    from tandem.runtime.compiled import warm_up

    spec = ModelRegistry().get(model_id)
    compiled = engine == "compiled"
    quant = quant or spec.default_quant
    lm = load_model(spec, LoadOptions(quant=quant, exits=False, compiled=compiled, kv_slots=batch))
    if compiled:
        bounds = [0, *spec.exit_layers, lm.model.cfg.n_layers]
        took = warm_up(lm.model, list(zip(bounds, bounds[1:], strict=False)))
        print(f"[selfdistill {model_id}] compiled in {took:.0f} s", file=sys.stderr, flush=True)
    return spec, lm


def main(argv: list[str] | None = None) -> int:
    """Collect self-distillation features for one model into one file (not committed)."""
    import argparse
    import json
    from pathlib import Path

    from tandem.data.instructions import TRAIN_POOL, load_instructions
    from tandem.runtime.engine_api import ChatMessage

    p = argparse.ArgumentParser(prog="python -m tandem.calibration.selfdistill")
    p.add_argument("--model", required=True)
    p.add_argument("--quant", help="default: the model's serving quantization")
    p.add_argument("--prompts", type=int, default=4000)
    p.add_argument("--max-new", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--engine",
        choices=["compiled", "eager"],
        default="compiled",
        help="compiled: static slots and compiled layer ranges; eager: the reference",
    )
    p.add_argument(
        "--minutes", type=float, help="stop after this long (whole batches; not reproducible)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--train-prompts", type=int, default=TRAIN_POOL, help="excluded from heldout")
    p.add_argument("--out", default=".cache/exits")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    deadline = None if args.minutes is None else time.monotonic() + args.minutes * 60
    spec, lm = load_for_collection(args.model, args.quant, args.engine, args.batch)
    quant = lm.quant
    if args.split == "train":
        ins = load_instructions("train", args.prompts, args.seed)
    else:
        train = frozenset(x.prompt for x in load_instructions("train", args.train_prompts))
        ins = load_instructions("heldout", args.prompts, args.seed, exclude=train)
    prompts = [lm.codec.encode_chat([ChatMessage(role="user", content=x.prompt)]) for x in ins]
    log = f"[selfdistill {args.model} {quant}]"
    feats, answers = collect(
        lm.model,
        prompts,
        spec.exit_layers,
        args.max_new,
        lm.codec.eos_ids,
        args.batch,
        log,
        deadline,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats.save(out / f"{args.model}.{args.split}.pt")
    meta = {
        "model": args.model,
        "quant": quant,
        "prompts": len(answers),
        "rows": feats.n,
        "answer_rows": int(feats.is_answer.sum()),
        "max_new": args.max_new,
        "seed": args.seed,
        "split": args.split,
        "engine": args.engine,
        "prompt_texts": [x.prompt for x in ins[: len(answers)]],
    }
    (out / f"{args.model}.{args.split}.json").write_text(json.dumps(meta))
    print(f"{log} wrote {feats.n} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
