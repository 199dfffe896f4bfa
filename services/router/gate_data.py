"""Training data for the MoE² gate: every expert's loss on real corpus continuations.

Each corpus item (fortunes prose, stdlib code, wordnet definitions; the category is the
source) is cut at a whitespace into a prompt and a reference continuation. For every expert,
loaded the way the router serves it (registry default quant), the label is the teacher-forced
negative log-likelihood of the continuation given the prompt, in nats, together with the
continuation's length in characters, so bits per character compare across tokenizers. The
features are smollm2's hidden states at its middle layer, mean-pooled over the prompt.

Splits come from the corpus's own disjoint splits: train -> train, heldout -> val,
test -> test. `python -m services.router.gate_data` (`make gate-data`) caches everything in
one ``.npz`` with a manifest ``.json`` beside it and skips the work when both are present.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tandem.data.corpus import load_corpus
from tandem.models.convert import ensure_converted
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.models.tokenizer import TextCodec

EXPERTS: tuple[str, ...] = ("smollm2", "gemma3", "qwen05", "qwen15")
FEATURE_MODEL = "smollm2"
SPLITS: tuple[tuple[str, str], ...] = (("train", "train"), ("val", "heldout"), ("test", "test"))
DEFAULT_PATH = Path("model_cache/gate/gate_data.npz")
BATCH = 8


@dataclass(frozen=True, slots=True)
class GatePrompt:
    category: str
    prompt: str
    continuation: str


@dataclass(frozen=True)
class GateSizes:
    """How much data to build: prompts per corpus source in each split, and cut lengths."""

    train: int = 35
    val: int = 12
    test: int = 15
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


def build_prompts(
    split: str, n_per_source: int, sizes: GateSizes, codecs: Sequence[TextCodec]
) -> list[GatePrompt]:
    """Cut corpus items into prompts whose prompt/continuation boundary is a token boundary
    for every codec (so every expert scores exactly the same continuation text)."""

    def aligned(prompt: str, cont: str) -> bool:
        return all(prompt_boundary(c, prompt, c.encode(prompt + cont)) is not None for c in codecs)

    out: list[GatePrompt] = []
    # Ask for spare items: a few have no aligned cut.
    for sample in load_corpus(split, 2 * n_per_source, sizes.seed):  # type: ignore[arg-type]
        if sum(p.category == sample.source for p in out) >= n_per_source:
            continue
        got = cut(sample.text, sizes.prompt_chars, sizes.continuation_chars, aligned)
        if got is not None:
            out.append(GatePrompt(sample.source, *got))
    return out


@torch.inference_mode()
def score(
    lm: LoadedModel, prompts: Sequence[GatePrompt], feature_layer: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Teacher-forced NLL (nats) of each continuation given its prompt, [P]; with
    ``feature_layer``, also the hidden states after that many layers mean-pooled over the
    prompt tokens (BOS excluded), [P, D]."""
    model, codec = lm.model, lm.codec
    n_layers = model.cfg.n_layers
    nll = np.zeros(len(prompts))
    feats: list[np.ndarray] = []
    for b in range(0, len(prompts), BATCH):
        batch = prompts[b : b + BATCH]
        ids = [codec.encode(p.prompt + p.continuation) for p in batch]
        ks = [prompt_boundary(codec, p.prompt, i) for p, i in zip(batch, ids, strict=True)]
        if any(k is None for k in ks):
            raise ValueError(f"{lm.spec.id}: prompt/continuation boundary is not a token edge")
        rows = [(model.new_kv(), 0, model.embed(torch.tensor(i))) for i in ids]
        if feature_layer is None:
            outs = model.run_rows(rows, 0, n_layers)
        else:
            mid = model.run_rows(rows, 0, feature_layer)
            for h, k in zip(mid, ks, strict=True):
                pooled = h[1:k] if k > 1 else h[:k]
                feats.append(pooled.float().mean(0).numpy())
            rows = [(kv, 0, h) for (kv, _, _), h in zip(rows, mid, strict=True)]
            outs = model.run_rows(rows, feature_layer, n_layers)
        for j, (h, i, k) in enumerate(zip(outs, ids, ks, strict=True)):
            logp = torch.log_softmax(model.logits(h[k - 1 : -1]).float(), dim=-1)
            target = torch.tensor(i[k:])
            nll[b + j] = -float(logp.gather(1, target[:, None]).sum())
    return nll, (np.stack(feats).astype(np.float32) if feature_layer is not None else None)


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


def build(
    sizes: GateSizes,
    experts: Sequence[str] = EXPERTS,
    registry: ModelRegistry | None = None,
    cache_dir: Path = Path("model_cache"),
    log: Callable[[str], None] = print,
) -> tuple[dict[str, GateData], dict]:
    """Build all splits; returns them and a manifest (sizes, models, timings)."""
    registry = registry or ModelRegistry()
    specs = [registry.get(e) for e in experts]
    codecs = [TextCodec(ensure_converted(s, cache_dir), ()) for s in specs]
    per_split = {"train": sizes.train, "val": sizes.val, "test": sizes.test}
    prompts = {
        name: build_prompts(corpus_split, per_split[name], sizes, codecs)
        for name, corpus_split in SPLITS
    }
    order = [(name, p) for name, _ in SPLITS for p in prompts[name]]
    flat = [p for _, p in order]
    log(f"gate-data: {', '.join(f'{k}={len(v)}' for k, v in prompts.items())} prompts")
    nll = np.zeros((len(flat), len(specs)))
    features: np.ndarray | None = None
    timings: dict[str, dict[str, float]] = {}
    for n, spec in enumerate(specs):
        t0 = time.perf_counter()
        lm = load_model(
            spec, LoadOptions(quant=spec.default_quant, exits=False, cache_dir=cache_dir)
        )
        t1 = time.perf_counter()
        layer = lm.model.cfg.n_layers // 2 if spec.id == FEATURE_MODEL else None
        nll[:, n], f = score(lm, flat, layer)
        if f is not None:
            features = f
        t2 = time.perf_counter()
        timings[spec.id] = {
            "load_s": t1 - t0,
            "score_s": t2 - t1,
            "per_prompt_s": (t2 - t1) / len(flat),
        }
        log(
            f"gate-data: {spec.id} ({spec.default_quant}) load {t1 - t0:.0f}s, "
            f"score {t2 - t1:.0f}s ({(t2 - t1) / len(flat):.2f}s/prompt)"
        )
        del lm
    if features is None:
        raise ValueError(f"the feature model {FEATURE_MODEL!r} must be one of the experts")
    chars = np.array([len(p.continuation) for p in flat])
    splits: dict[str, GateData] = {}
    for name, _ in SPLITS:
        idx = np.array([i for i, (s, _) in enumerate(order) if s == name])
        splits[name] = GateData(
            tuple(experts),
            features[idx],
            nll[idx],
            chars[idx],
            tuple(flat[i].category for i in idx),
            tuple(flat[i].prompt for i in idx),
        )
    manifest = {
        "sizes": asdict(sizes),
        "experts": {s.id: s.default_quant for s in specs},
        "feature_model": FEATURE_MODEL,
        "feature_dim": int(features.shape[1]),
        "counts": {k: len(v) for k, v in splits.items()},
        "timings": timings,
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
    ap.add_argument("--train", type=int, default=GateSizes.train, help="prompts per source")
    ap.add_argument("--val", type=int, default=GateSizes.val)
    ap.add_argument("--test", type=int, default=GateSizes.test)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    if args.out.exists() and args.out.with_suffix(".json").exists() and not args.force:
        print(f"gate-data: cached at {args.out} (use --force to rebuild)")
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    splits, manifest = build(GateSizes(args.train, args.val, args.test))
    manifest["total_s"] = time.perf_counter() - t0
    save(splits, manifest, args.out)
    for name, d in splits.items():
        bpc = ", ".join(f"{e} {b:.3f}" for e, b in zip(d.experts, d.bits_per_char(), strict=True))
        print(f"gate-data: {name} ({len(d)} prompts) bits/char: {bpc}")
    print(f"gate-data: wrote {args.out} in {manifest['total_s']:.0f}s")


if __name__ == "__main__":
    main()
