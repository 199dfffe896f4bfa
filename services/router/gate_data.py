"""Training data for the MoE² gate: every expert's loss on prompts of eight kinds of text
and task (services.router.gate_prompts: corpus continuations, Python reference docs, licence
text, chat instructions with reference answers, code tasks).

Raw items are cut at a whitespace into a prompt and a reference continuation whose boundary
is a token edge for every expert; chat items put the user message behind each expert's own
chat template and score the reference answer after it. For every expert, loaded the way the
router serves it (registry default quant, tandem.models.loader), the label is the
teacher-forced negative log-likelihood of the continuation in nats, with the continuation's
length in characters, so bits per character compare across tokenizers. The features are
smollm2's hidden states at its middle layer, mean-pooled over the gate text (the raw prompt,
or the user message: what ``features.gate_text`` gives the router).

Scoring is CPU-heavy, so `python -m services.router.gate_data` (`make gate-data`) is
incremental and budgeted: each job (features, then one per expert, cheapest first) writes
one small file per batch under ``model_cache/gate/jobs/`` and skips the batches already
there, so a restart resumes; ``--budget-s`` stops starting batches after that many
seconds, and an expert not scored on a prompt is NaN there (the gate and the benches
say how many rows each expert has). Each job walks the prompts in one fixed, shuffled
order, so a partial job is a random sample of every domain. Run it with one thread at
nice 19 (``make gate-data`` does). The assembled ``.npz`` and a manifest ``.json`` are
written at the end; splits come from the corpus's hash split of each text (train -> train,
heldout -> val, test -> test).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from services.router.gate_prompts import DOMAINS, GateItem, domain_items
from tandem.models.convert import ensure_converted
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.models.tokenizer import TextCodec
from tandem.runtime.engine_api import ChatMessage

EXPERTS: tuple[str, ...] = ("smollm2", "gemma3", "qwen05", "qwen15")
FEATURE_MODEL = "smollm2"
SPLITS: tuple[tuple[str, str], ...] = (("train", "train"), ("val", "heldout"), ("test", "test"))
DEFAULT_PATH = Path("model_cache/gate/gate_data.npz")
BATCH = 8


@dataclass(frozen=True)
class GateSizes:
    """How much data to build: prompts per domain, and cut lengths."""

    per_domain: int = 260
    prompt_chars: int = 96
    continuation_chars: int = 64
    seed: int = 0


@dataclass(frozen=True)
class GateData:
    """One split: row i is one prompt. ``nll[i, n]`` is expert n's NLL (nats) of the
    continuation; ``chars[i]`` its length in characters."""

    experts: tuple[str, ...]
    features: np.ndarray  # [P, D] float32
    nll: np.ndarray  # [P, N] float64, nats
    chars: np.ndarray  # [P] int
    categories: tuple[str, ...]
    prompts: tuple[str, ...] = ()  # the prompt texts, when stored

    def __len__(self) -> int:
        return int(self.chars.shape[0])

    def complete(self) -> GateData:
        """The rows every expert was scored on (a budgeted build leaves NaN elsewhere)."""
        rows = np.flatnonzero(np.isfinite(self.nll).all(1))
        return GateData(
            self.experts,
            self.features[rows],
            self.nll[rows],
            self.chars[rows],
            tuple(self.categories[i] for i in rows),
            tuple(self.prompts[i] for i in rows) if self.prompts else (),
        )

    def bits_per_char(self) -> np.ndarray:
        """Per-expert bits/char over the split, [N] (total NLL over total characters)."""
        return self.nll.sum(0) / self.chars.sum() / np.log(2)


def cut(text: str, prompt_chars: int, continuation_chars: int, ok: Callable[[str, str], bool]):
    """Split ``text`` at a whitespace into (prompt, continuation): the prompt as long as
    possible up to ``prompt_chars`` (at least a third of it), the continuation up to
    ``continuation_chars`` (at least 16). ``ok`` rejects cuts (tokenizer misalignment).
    Returns None when no cut fits."""
    lo = max(8, prompt_chars // 3)
    hi = min(prompt_chars, len(text) - 16)
    for i in range(hi, lo - 1, -1):
        if text[i] not in " \n" or text[i - 1].isspace():
            continue
        prompt, cont = text[:i], text[i : i + continuation_chars]
        if ok(prompt, cont):
            return prompt, cont
    return None


def prompt_boundary(codec: TextCodec, prompt: str, ids: Sequence[int]) -> int | None:
    """The k with decode(ids[:k]) == prompt, where ids encode prompt + continuation:
    the continuation's tokens are then exactly ids[k:]. None when a token straddles."""
    for k in range(len(ids) - 1, 0, -1):
        text = codec.decode(ids[:k])
        if text == prompt:
            return k
        if len(text) < len(prompt):
            return None
    return None


def _clip_words(text: str, n: int) -> str:
    """At most n characters of ``text``, cut at a whitespace where there is one."""
    if len(text) <= n:
        return text
    i = text.rfind(" ", n // 2, n + 1)
    return text[: i if i > 0 else n]


def answer_ids(codec: TextCodec, text: str) -> list[int]:
    """``text`` tokenized as a continuation (without the BOS the tokenizer adds)."""
    ids, lead = codec.encode(text), codec.encode("")
    return ids[len(lead) :] if ids[: len(lead)] == lead else ids


def token_rows(codec: TextCodec, item: GateItem) -> tuple[list[int], int]:
    """(ids, k): the tokens of prompt + continuation as this expert serves the item, and
    where the continuation starts (it is exactly ids[k:])."""
    if item.chat:
        prompt = codec.encode_chat([ChatMessage("user", item.prompt)])
        return prompt + answer_ids(codec, item.continuation), len(prompt)
    ids = codec.encode(item.prompt + item.continuation)
    k = prompt_boundary(codec, item.prompt, ids)
    if k is None:
        raise ValueError("prompt/continuation boundary is not a token edge")
    return ids, k


def build_prompts(sizes: GateSizes, codecs: Sequence[TextCodec]) -> list[GateItem]:
    """``sizes.per_domain`` prompts of every domain: raw texts cut where the boundary is a
    token edge for every codec (every expert scores exactly the same continuation text),
    chat answers clipped at a whitespace."""

    def aligned(prompt: str, cont: str) -> bool:
        return all(prompt_boundary(c, prompt, c.encode(prompt + cont)) is not None for c in codecs)

    out: list[GateItem] = []
    for domain, items in domain_items(sizes.per_domain, sizes.continuation_chars).items():
        got: list[GateItem] = []
        for item in items:
            if len(got) >= sizes.per_domain:
                break
            if item.chat:
                cont = _clip_words(item.continuation, sizes.continuation_chars)
                got.append(GateItem(domain, item.split, item.prompt, cont, True))
                continue
            pc = cut(item.prompt, sizes.prompt_chars, sizes.continuation_chars, aligned)
            if pc is not None:
                got.append(GateItem(domain, item.split, *pc))
        out += got
    return out


@torch.inference_mode()
def score_rows(lm: LoadedModel, items: Sequence[GateItem]) -> np.ndarray:
    """Teacher-forced NLL (nats) of each item's continuation, [P], in one batch."""
    model, codec = lm.model, lm.codec
    rows = [token_rows(codec, it) for it in items]
    batch = [(model.new_kv(), 0, model.embed(torch.tensor(ids))) for ids, _ in rows]
    outs = model.run_rows(batch, 0, model.cfg.n_layers)
    nll = np.zeros(len(items))
    for j, (h, (ids, k)) in enumerate(zip(outs, rows, strict=True)):
        logp = torch.log_softmax(model.logits(h[k - 1 : -1]).float(), dim=-1)
        target = torch.tensor(ids[k:])
        nll[j] = -float(logp.gather(1, target[:, None]).sum())
    return nll


@torch.inference_mode()
def feature_rows(lm: LoadedModel, texts: Sequence[str]) -> np.ndarray:
    """``prompt_features`` for several texts in one batch, [P, D] float32."""
    model = lm.model
    layer = model.cfg.n_layers // 2
    ids = [lm.codec.encode(t) for t in texts]
    batch = [(model.new_kv(), 0, model.embed(torch.tensor(i))) for i in ids]
    outs = model.run_rows(batch, 0, layer)
    return np.stack(
        [
            (h[1:] if len(i) > 1 else h).float().mean(0).numpy()
            for h, i in zip(outs, ids, strict=True)
        ]
    ).astype(np.float32)


@torch.inference_mode()
def prompt_features(lm: LoadedModel, texts: Sequence[str]) -> np.ndarray:
    """The gate's features for raw prompts, as the router computes them at request time:
    the hidden states after the first half of the layers, mean-pooled over the prompt
    tokens (BOS excluded), [P, D] float32. Same as the features `build` caches."""
    model = lm.model
    layer = model.cfg.n_layers // 2
    out = []
    for text in texts:
        ids = lm.codec.encode(text)
        h = model.run_sequence(model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, layer)
        out.append((h[1:] if len(ids) > 1 else h).float().mean(0).numpy())
    return np.stack(out).astype(np.float32)


def job_order(n: int, seed: int) -> np.ndarray:
    """The fixed order every job walks the prompts in (so a partial job is a random
    sample of all domains)."""
    return np.random.default_rng(seed).permutation(n)


class JobCache:
    """One job's results, one ``.npz`` per batch (``idx`` and ``value``) in ``root``; a
    batch file is written atomically, so an interrupted run loses at most one batch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, b: int) -> Path:
        return self.root / f"{b:06d}.npz"

    def done(self, b: int) -> bool:
        return self.path(b).exists()

    def put(self, b: int, idx: np.ndarray, value: np.ndarray) -> None:
        tmp = self.root / f".{b:06d}.tmp.npz"
        np.savez(tmp, idx=idx, value=value)
        os.replace(tmp, self.path(b))

    def collect(self, n: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """[n, *shape] with NaN where nothing is cached (``shape`` None: from the files)."""
        files = sorted(self.root.glob("[0-9]*.npz"))
        if shape is None:
            if not files:
                raise FileNotFoundError(f"no cached batches in {self.root}")
            with np.load(files[0]) as z:
                shape = tuple(z["value"].shape[1:])
        out = np.full((n, *shape), np.nan, dtype=np.float64 if not shape else np.float32)
        for p in files:
            with np.load(p) as z:
                out[z["idx"]] = z["value"]
        return out


def run_jobs(
    jobs: Sequence[tuple[str, Callable[[Sequence[GateItem]], np.ndarray], JobCache]],
    items: Sequence[GateItem],
    order: np.ndarray,
    deadline: float,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Score ``items`` in ``order``, BATCH at a time, for every job in turn batch by batch
    (so experts of one round progress together and a budget cut leaves them scored on the
    same prompts), skipping cached batches, until done or ``deadline`` (time.monotonic()).
    Returns, per job, rows done now and their seconds."""
    stats = {name: {"rows": 0, "seconds": 0.0} for name, _, _ in jobs}
    n_batches = -(-len(items) // BATCH)
    for b in range(n_batches):
        for name, fn, cache in jobs:
            if cache.done(b):
                continue
            if time.monotonic() > deadline:
                log(f"gate-data: budget spent at batch {b}/{n_batches} ({name})")
                return stats
            idx = order[b * BATCH : (b + 1) * BATCH]
            t0 = time.perf_counter()
            value = fn([items[i] for i in idx])
            st = stats[name]
            st["seconds"] += time.perf_counter() - t0
            st["rows"] += len(idx)
            cache.put(b, idx, value)
            if b % 25 == 0:
                rate = st["rows"] / max(st["seconds"], 1e-9)
                log(f"gate-data: {name}: batch {b}/{n_batches}, {rate:.2f} rows/s")
    return stats


def run_job(
    name: str,
    fn: Callable[[Sequence[GateItem]], np.ndarray],
    items: Sequence[GateItem],
    cache: JobCache,
    order: np.ndarray,
    deadline: float,
    log: Callable[[str], None],
) -> dict[str, float]:
    """`run_jobs` for one job."""
    return run_jobs([(name, fn, cache)], items, order, deadline, log)[name]


# Experts scored together, batch by batch (see run_jobs), cheapest round first: the feature
# model alone (its features first), then the other edge experts, then the largest.
ROUNDS: tuple[tuple[str, ...], ...] = (("smollm2",), ("gemma3", "qwen05"), ("qwen15",))


def build(
    sizes: GateSizes,
    experts: Sequence[str] = EXPERTS,
    registry: ModelRegistry | None = None,
    cache_dir: Path = Path("model_cache"),
    jobs_dir: Path = DEFAULT_PATH.parent / "jobs",
    budget_s: float = float("inf"),
    log: Callable[[str], None] = print,
) -> tuple[dict[str, GateData], dict]:
    """Build all splits within ``budget_s`` (resuming cached batches); returns them and a
    manifest (sizes, models, timings, rows scored per expert)."""
    deadline = time.monotonic() + budget_s
    registry = registry or ModelRegistry()
    specs = [registry.get(e) for e in experts]
    if FEATURE_MODEL not in experts:
        raise ValueError(f"the feature model {FEATURE_MODEL!r} must be one of the experts")
    codecs = [TextCodec(ensure_converted(s, cache_dir), ()) for s in specs]
    items = build_prompts(sizes, codecs)
    key = f"{len(items)}-{sizes.per_domain}-{sizes.prompt_chars}-{sizes.continuation_chars}"
    jobs_dir = jobs_dir / key
    jobs_dir.mkdir(parents=True, exist_ok=True)
    (jobs_dir / "prompts.json").write_text(json.dumps([asdict(i) for i in items]) + "\n")
    order = job_order(len(items), sizes.seed)
    log(f"gate-data: {len(items)} prompts in {len(set(i.domain for i in items))} domains")
    timings: dict[str, dict[str, float]] = {}
    features: np.ndarray | None = None
    nll = np.full((len(items), len(specs)), np.nan)
    rounds = [[e for e in r if e in experts] for r in ROUNDS]
    rounds = [r for r in rounds if r] + [[e] for e in experts if not any(e in r for r in ROUNDS)]
    for names in rounds:
        if time.monotonic() > deadline:  # budget spent: only the cached scores
            if FEATURE_MODEL in names:
                features = JobCache(jobs_dir / "features").collect(len(items))
            for e in names:
                n = experts.index(e)
                nll[:, n] = JobCache(jobs_dir / e).collect(len(items), ())
                timings[e] = {"scored": int(np.isfinite(nll[:, n]).sum())}
            continue
        lms: dict[str, LoadedModel] = {}
        load_s: dict[str, float] = {}
        for e in names:
            spec = specs[experts.index(e)]
            t0 = time.perf_counter()
            lms[e] = load_model(
                spec, LoadOptions(quant=spec.default_quant, exits=False, cache_dir=cache_dir)
            )
            load_s[e] = time.perf_counter() - t0
        if FEATURE_MODEL in lms:
            lm = lms[FEATURE_MODEL]
            cache = JobCache(jobs_dir / "features")
            t = run_job(
                "features",
                lambda batch, lm=lm: feature_rows(lm, [i.gate_text for i in batch]),
                items,
                cache,
                order,
                deadline,
                log,
            )
            features = cache.collect(len(items), (lm.model.cfg.hidden_size,))
            timings["features"] = {"load_s": load_s[FEATURE_MODEL], **t}
        jobs = [
            (e, lambda batch, lm=lms[e]: score_rows(lm, batch), JobCache(jobs_dir / e))
            for e in names
        ]
        stats = run_jobs(jobs, items, order, deadline, log)
        for e, _, cache in jobs:
            n = experts.index(e)
            nll[:, n] = cache.collect(len(items), ())
            scored = int(np.isfinite(nll[:, n]).sum())
            timings[e] = {"load_s": load_s[e], **stats[e], "scored": scored}
            log(f"gate-data: {e} ({specs[n].default_quant}) {timings[e]}")
        del lms
    assert features is not None
    keep = np.isfinite(features).all(1)  # a prompt without features is no gate row
    chars = np.array([len(i.continuation) for i in items])
    splits: dict[str, GateData] = {}
    for name, corpus_split in SPLITS:
        idx = np.array([j for j, i in enumerate(items) if i.split == corpus_split and keep[j]])
        splits[name] = GateData(
            tuple(experts),
            features[idx],
            nll[idx],
            chars[idx],
            tuple(items[j].domain for j in idx),
            tuple(items[j].prompt for j in idx),
        )
    manifest = {
        "sizes": asdict(sizes),
        "domains": list(DOMAINS),
        "experts": {s.id: s.default_quant for s in specs},
        "feature_model": FEATURE_MODEL,
        "feature_dim": int(features.shape[1]),
        "prompts": len(items),
        "counts": {k: len(v) for k, v in splits.items()},
        "scored": {e: int(np.isfinite(nll[keep, n]).sum()) for n, e in enumerate(experts)},
        "timings": timings,
        "threads": torch.get_num_threads(),
    }
    return splits, manifest


def save(splits: dict[str, GateData], manifest: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, d in splits.items():
        arrays[f"{name}_features"] = d.features
        arrays[f"{name}_nll"] = d.nll
        arrays[f"{name}_chars"] = d.chars
        arrays[f"{name}_categories"] = np.array(d.categories)
        if d.prompts:
            arrays[f"{name}_prompts"] = np.array(d.prompts)
    arrays["experts"] = np.array(next(iter(splits.values())).experts)
    np.savez(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")


def load(path: Path = DEFAULT_PATH) -> dict[str, GateData]:
    with np.load(path) as z:
        experts = tuple(str(e) for e in z["experts"])
        return {
            name: GateData(
                experts,
                z[f"{name}_features"],
                z[f"{name}_nll"],
                z[f"{name}_chars"],
                tuple(str(c) for c in z[f"{name}_categories"]),
                tuple(str(t) for t in z[f"{name}_prompts"]) if f"{name}_prompts" in z else (),
            )
            for name, _ in SPLITS
        }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--per-domain", type=int, default=GateSizes.per_domain)
    ap.add_argument("--budget-s", type=float, default=3600.0, help="stop scoring after this")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared host)")
    ap.add_argument("--force", action="store_true", help="reassemble even if cached")
    ap.add_argument(
        "--assemble", action="store_true", help="only reassemble the cached scores (no models)"
    )
    args = ap.parse_args(argv)
    if args.assemble:
        args.force, args.budget_s = True, 0.0
    if args.out.exists() and args.out.with_suffix(".json").exists() and not args.force:
        print(f"gate-data: cached at {args.out} (use --force to resume / reassemble)")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    splits, manifest = build(GateSizes(args.per_domain), budget_s=args.budget_s)
    manifest["total_s"] = time.perf_counter() - t0
    save(splits, manifest, args.out)
    for name, d in splits.items():
        bpc = ", ".join(f"{e} {b:.3f}" for e, b in zip(d.experts, d.bits_per_char(), strict=True))
        print(f"gate-data: {name} ({len(d)} prompts) bits/char: {bpc}")
    print(f"gate-data: wrote {args.out} in {manifest['total_s']:.0f}s ({manifest['scored']})")


if __name__ == "__main__":
    main()
