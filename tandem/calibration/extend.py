"""`python -m tandem.calibration.extend`: more self-distillation rows beside an existing
cache, resumable, one small file per batch.

`tandem.calibration.selfdistill` writes one `<model>.<split>.pt` (+ `.json` listing its
prompt texts) at the end of a run. This module continues such a cache with *new* prompts:
the same prompt list (`load_instructions("train", --pool, seed)`), minus every prompt
already in the base cache, in order. Each batch of prompts is written to
`<base>.extra/part-NNNNN.pt` (atomically: a kill loses at most the batch in flight) and
a restart continues after the last part. Prompt indices (`seq_index`) of the parts go on
from the base cache's, so `load_with_extras` can concatenate base and parts into one
`Features` whose first `base_prompts` prompts are exactly the base cache's (whose
train/val/test split therefore stays what it was, see sd_heads).

Meant to run in the background on one thread at low priority; no wall-clock deadline is
needed (stop it any time, start it again to continue).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.calibration.selfdistill import Features, load_for_collection, run_batch


@dataclass(frozen=True)
class ExtraPart:
    path: Path
    first_prompt: int  # index of its first prompt among the new prompts
    n_prompts: int


def extras_dir(base: Path) -> Path:
    """`x/qwen15.train.pt` -> `x/qwen15.train.extra`."""
    return base.with_suffix(".extra")


def list_parts(directory: Path) -> list[ExtraPart]:
    """The finished parts in `directory`, in order (their manifests say which prompts)."""
    parts = []
    for meta in sorted(directory.glob("part-*.json")):
        info = json.loads(meta.read_text())
        pt = meta.with_suffix(".pt")
        if pt.exists():
            parts.append(ExtraPart(pt, info["first_prompt"], len(info["prompt_texts"])))
    parts.sort(key=lambda p: p.first_prompt)
    done = 0
    for p in parts:  # contiguous from prompt 0, or the set is not what a resume would write
        if p.first_prompt != done:
            raise ValueError(
                f"{directory}: part {p.path.name} starts at {p.first_prompt}, expected {done}"
            )
        done += p.n_prompts
    return parts


def new_prompts(pool: list[str], existing: list[str]) -> list[str]:
    """`pool` in order without the prompts in `existing` and without repeats."""
    seen = set(existing)
    out = []
    for p in pool:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def load_with_extras(base: Path, max_parts: int | None = None) -> tuple[Features, int]:
    """The base cache and its parts as one Features; also the base's prompt count."""
    feats = Features.load(base)
    base_prompts = int(json.loads(base.with_suffix(".json").read_text())["prompts"])
    if int(feats.seq_index.max()) + 1 != base_prompts:
        raise ValueError(f"{base}: seq_index does not match the manifest's prompt count")
    d = extras_dir(base)
    parts = list_parts(d) if d.exists() else []
    if max_parts is not None:
        parts = parts[:max_parts]
    if parts:
        feats = Features.cat([feats, *(Features.load(p.path) for p in parts)])
    return feats, base_prompts


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


def _atomic_save(obj_save, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    obj_save(tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from tandem.data.instructions import TRAIN_POOL, load_instructions
    from tandem.runtime.engine_api import ChatMessage

    p = argparse.ArgumentParser(prog="python -m tandem.calibration.extend")
    p.add_argument("--model", required=True)
    p.add_argument("--base", required=True, help="the existing <model>.train.pt")
    p.add_argument("--pool", type=int, default=TRAIN_POOL, help="prompts in the list drawn from")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-batches", type=int, help="stop after this many new parts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engine", choices=["compiled", "eager"], default="compiled")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = Path(args.base)
    meta = json.loads(base.with_suffix(".json").read_text())
    if meta["model"] != args.model or meta["split"] != "train":
        raise SystemExit(f"{base}: not a train cache of {args.model}")
    torch.manual_seed(meta["seed"])
    pool = [x.prompt for x in load_instructions("train", args.pool, meta["seed"])]
    todo = new_prompts(pool, meta["prompt_texts"])
    out = extras_dir(base)
    out.mkdir(exist_ok=True)
    done = sum(p.n_prompts for p in list_parts(out))
    spec, lm = load_for_collection(args.model, meta["quant"], args.engine, args.batch)
    log = f"[extend {args.model} {meta['quant']}]"
    print(f"{log} {done}/{len(todo)} new prompts already collected", file=sys.stderr)
    t0 = time.perf_counter()
    n_rows = n_ans = batches = 0
    while done < len(todo) and (args.max_batches is None or batches < args.max_batches):
        texts = todo[done : done + args.batch]
        prompts = [lm.codec.encode_chat([ChatMessage(role="user", content=t)]) for t in texts]
        feats, _ = run_batch(
            lm.model,
            prompts,
            spec.exit_layers,
            meta["max_new"],
            lm.codec.eos_ids,
            first_index=meta["prompts"] + done,
        )
        stem = out / f"part-{done:05d}"
        _atomic_save(feats.save, stem.with_suffix(".pt"))
        info = {"first_prompt": done, "rows": feats.n, "prompt_texts": texts}
        _atomic_save(functools.partial(_write_text, json.dumps(info)), stem.with_suffix(".json"))
        done += len(texts)
        batches += 1
        n_rows += feats.n
        n_ans += int(feats.is_answer.sum())
        dt = time.perf_counter() - t0
        print(
            f"{log} {done}/{len(todo)} new prompts, +{n_rows} rows ({n_ans} answer) "
            f"this run, {dt:.0f} s, {n_ans / dt:.1f} answer tok/s",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
