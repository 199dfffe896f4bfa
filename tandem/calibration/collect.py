"""Teacher data for exit heads: hidden states at each exit and the final layer's distribution.

The model (bf16, no grad, a fresh KV cache per text) runs over corpus texts truncated to
`MAX_LEN` tokens, layer range by layer range: [0, e1), [e1, e2), ..., [e_last, n_layers).
Per token we keep the hidden state after each exit layer and after the last layer. Position
0 (BOS, or the first token where the tokenizer adds none) is dropped: it is never an exit
point when decoding, and its hidden state is an outlier (attention sink).

From the final layer we derive, without ever holding [N, vocab] logits:

- the shortlist: the K tokens the final layer predicts (argmax) most often; ties and any
  remaining slots are filled by next-token frequency, then input-token frequency, then
  total softmax mass, then token id. The EOS ids always come first.
- the targets [N, K + 1] fp16: the full softmax's probabilities of the shortlisted tokens
  plus "other" = 1 - their sum.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tandem.data.corpus import Split, load_corpus
from tandem.runtime.model import DecoderModel, Segment

MAX_LEN = 128  # tokens per text, BOS included
DEFAULT_SHORTLIST = 4096
BATCH_TOKENS = 2048  # rows per forward (several texts, one flat batch)


def adds_bos(tok, bos_id: int | None) -> bool:
    """Whether a text starts with BOS: the model has one and its tokenizer adds it by default.

    gemma3's tokenizer adds <bos> (and the model needs it). SmolLM2's configured BOS is the
    chat marker <|im_start|>, which its tokenizer never adds to plain text; Qwen has none.
    """
    if bos_id is None or tok.bos_token_id is None:
        return False
    probe = tok("a").input_ids
    return bool(probe) and probe[0] == tok.bos_token_id == bos_id


def encode_corpus(
    tok,
    bos_id: int | None,
    split: Split,
    n_tokens: int,
    seed: int = 0,
    max_len: int = MAX_LEN,
) -> list[list[int]]:
    """Token ids of corpus texts (sources interleaved) until `n_tokens` rows are covered.

    A row is a position >= 1 of a text; the last text is cut so the total is exact.
    """
    bos = [bos_id] if adds_bos(tok, bos_id) else []
    n_per_source = max(8, n_tokens // 150)
    while True:
        out: list[list[int]] = []
        total = 0
        for sample in load_corpus(split, n_per_source, seed):
            ids = (bos + tok(sample.text, add_special_tokens=False).input_ids)[:max_len]
            if len(ids) < 2:
                continue
            take = min(len(ids) - 1, n_tokens - total)
            out.append(ids[: take + 1])
            total += take
            if total >= n_tokens:
                return out
        n_per_source *= 2  # load_corpus is prefix-stable: a larger n extends the same order


@dataclass
class Activations:
    exit_layers: tuple[int, ...]
    hidden: list[torch.Tensor]  # per exit, [N, d] in the model's dtype
    final: torch.Tensor  # [N, d] after the last layer, before the final norm
    input_ids: torch.Tensor  # [N] the token at each row
    next_ids: torch.Tensor  # [N] the next token in the text, -1 at a text's end
    text_index: torch.Tensor  # [N] which text each row comes from
    final_argmax: torch.Tensor  # [N] argmax of the full final logits
    final_lse: torch.Tensor  # [N] fp32 logsumexp of the full final logits
    prob_mass: torch.Tensor  # [vocab] fp32 sum over rows of the final softmax
    n_texts: int

    @property
    def n_tokens(self) -> int:
        return self.final.shape[0]


def _batches(seqs: Sequence[list[int]], batch_tokens: int) -> Iterator[list[int]]:
    batch: list[int] = []
    size = 0
    for i, ids in enumerate(seqs):
        if batch and size + len(ids) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += len(ids)
    if batch:
        yield batch


def logit_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that fp32 logits stay around 256 MiB."""
    return max(16, (1 << 26) // vocab_size)


@torch.inference_mode()
def collect_activations(
    model: DecoderModel,
    seqs: Sequence[list[int]],
    exit_layers: Sequence[int],
    batch_tokens: int = BATCH_TOKENS,
    log_prefix: str | None = None,
) -> Activations:
    cfg = model.cfg
    bounds = [*exit_layers, cfg.n_layers]
    if list(bounds) != sorted(set(bounds)) or bounds[0] <= 0:
        raise ValueError(f"exit layers {tuple(exit_layers)} must increase within (0, n_layers)")
    hidden: list[list[torch.Tensor]] = [[] for _ in bounds]
    inputs, nexts, owners, argmaxes, lses = [], [], [], [], []
    mass = torch.zeros(cfg.vocab_size)
    chunk = logit_chunk_rows(cfg.vocab_size)
    t0, done, total = time.perf_counter(), 0, sum(len(s) - 1 for s in seqs)
    for batch in _batches(seqs, batch_tokens):
        flat: list[int] = []
        pos: list[int] = []
        nxt: list[int] = []
        owner: list[int] = []
        segments = []
        for i in batch:
            ids = seqs[i]
            segments.append(
                Segment(kv=model.new_kv(), start=len(flat), count=len(ids), start_pos=0)
            )
            flat.extend(ids)
            pos.extend(range(len(ids)))
            nxt.extend([*ids[1:], -1])
            owner.extend([i] * len(ids))
        positions = torch.tensor(pos)
        keep = positions != 0
        h = model.embed(torch.tensor(flat))
        start = 0
        for j, end in enumerate(bounds):
            h = model.run_layers(h, positions, segments, start, end)
            hidden[j].append(h[keep])  # boolean indexing copies
            start = end
        inputs.append(torch.tensor(flat)[keep])
        nexts.append(torch.tensor(nxt)[keep])
        owners.append(torch.tensor(owner)[keep])
        final = hidden[-1][-1]
        for rows in final.split(chunk):
            logits = model.logits(rows).float()
            argmaxes.append(logits.argmax(-1))
            lse = torch.logsumexp(logits, -1)
            lses.append(lse)
            mass += torch.exp(logits - lse[:, None]).sum(0)
        done += int(keep.sum())
        if log_prefix is not None:
            rate = done / (time.perf_counter() - t0)
            print(f"{log_prefix} {done}/{total} tokens ({rate:.0f} tok/s)", file=sys.stderr)
    return Activations(
        exit_layers=tuple(exit_layers),
        hidden=[torch.cat(x) for x in hidden[:-1]],
        final=torch.cat(hidden[-1]),
        input_ids=torch.cat(inputs),
        next_ids=torch.cat(nexts),
        text_index=torch.cat(owners),
        final_argmax=torch.cat(argmaxes),
        final_lse=torch.cat(lses),
        prob_mass=mass,
        n_texts=len(seqs),
    )


def choose_shortlist(acts: Activations, k: int, eos_ids: Sequence[int]) -> torch.Tensor:
    """The K shortlisted vocabulary ids, best first (see the module docstring)."""
    vocab = acts.prob_mass.shape[0]
    k = min(k, vocab)

    def counts(ids: torch.Tensor) -> np.ndarray:
        return torch.bincount(ids[ids >= 0], minlength=vocab).numpy()

    is_eos = np.zeros(vocab, dtype=np.int64)
    is_eos[[e for e in eos_ids if 0 <= e < vocab]] = 1
    order = np.lexsort(
        (
            np.arange(vocab),
            -acts.prob_mass.double().numpy(),
            -counts(acts.input_ids),
            -counts(acts.next_ids),
            -counts(acts.final_argmax),
            -is_eos,
        )
    )
    return torch.from_numpy(order[:k].copy()).long()


@torch.inference_mode()
def shortlist_targets(
    model: DecoderModel, acts: Activations, shortlist: torch.Tensor
) -> torch.Tensor:
    """[N, K + 1] fp16: final-softmax probabilities of the shortlisted tokens, then "other"."""
    w = model.lm_head.weight[shortlist]
    cap = model.cfg.final_softcap
    out = torch.empty(acts.n_tokens, shortlist.shape[0] + 1, dtype=torch.float16)
    chunk = 1024
    for s in range(0, acts.n_tokens, chunk):
        z = F.linear(model.norm(acts.final[s : s + chunk]), w)  # as model.logits does
        if cap:
            z = torch.tanh(z / cap) * cap
        p = torch.exp(z.float() - acts.final_lse[s : s + chunk, None])
        other = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
        out[s : s + chunk] = torch.cat([p, other], -1).half()
    return out


def eos_ids_of(model: DecoderModel, tok) -> tuple[int, ...]:
    ids = list(model.cfg.eos_ids)
    if tok is not None and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return tuple(dict.fromkeys(ids))
