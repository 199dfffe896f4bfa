"""Quality measures of `make bench-collab`: served-stream bits/char (bench/collab_quality.py)
and the corpus teacher-forced exit table (bench.collab.corpus_teacher_forced)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.collab import corpus_teacher_forced
from bench.collab_quality import StreamScorer, stream_logprobs
from tandem.calibration.train import make_head
from tandem.runtime.exit_head import decide
from tests.tiny import ByteCodec, tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)  # peaked distributions: greedy is clearly cheapest
    return m


@torch.no_grad()
def _next_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the full model's next-token logits after `ids`, from a fresh run."""
    h = model.run_sequence(model.embed(torch.tensor(ids)), model.new_kv(), 0, 0, model.cfg.n_layers)
    return torch.log_softmax(model.logits(h[-1:]).float(), -1)[0]


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(_next_logprobs(model, prompt + out).argmax()))
    return out


def test_stream_logprobs_are_each_tokens_own_prefix(model):
    prompt, output = [1, 40, 41, 42, 43], [50, 60, 70, 80, 90, 100]
    got = stream_logprobs(model, prompt, output)
    want = torch.stack(
        [_next_logprobs(model, prompt + output[:j])[t] for j, t in enumerate(output)]
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_wrong_token_costs_bits_and_greedy_is_cheapest(model):
    codec = ByteCodec()
    prompt = [1, 72, 101, 108, 108, 111]
    greedy = _greedy(model, prompt, 8)
    # a "confident exit" on a token the full model finds unlikely, at position 3
    lp3 = _next_logprobs(model, prompt + greedy[:3])
    wrong = [*greedy[:3], int(lp3.argmin()), *greedy[4:]]
    scorer = StreamScorer(model, codec.decode)
    g, w = scorer.score(prompt, greedy), scorer.score(prompt, wrong)
    assert g.tokens == w.tokens == 8
    assert math.isfinite(w.bits)
    assert w.bits > g.bits + 1.0
    # the prefix costs the same; the wrong token costs its gap to the argmax, in bits
    lg, lw = stream_logprobs(model, prompt, greedy), stream_logprobs(model, prompt, wrong)
    torch.testing.assert_close(lg[:3], lw[:3])
    assert float(lg[3] - lw[3]) == pytest.approx(float(lp3.max() - lp3.min()), rel=1e-4)
    assert g.chars == len(codec.decode(greedy))


def test_bits_per_char_pools_clients_and_prompts(model):
    codec = ByteCodec()
    prompts = [[1, 80, 81], [1, 90, 91, 92]]
    a, b = [100, 101, 102], [110, 111]
    scorer = StreamScorer(model, codec.decode)
    one = scorer.bits_per_char(prompts, [[a, b]])
    two = scorer.bits_per_char(prompts, [[a, b], [a, b]])
    sa, sb = scorer.score(prompts[0], a), scorer.score(prompts[1], b)
    assert one == pytest.approx((sa.bits + sb.bits) / (sa.chars + sb.chars))
    assert two == pytest.approx(one)
    assert scorer.bits_per_char(prompts, [[[], []]]) is None


def test_corpus_exits_are_counted_with_their_agreement(model):
    vocab = model.cfg.vocab_size
    shortlist = torch.arange(3, 3 + 64)
    torch.manual_seed(0)
    heads = [make_head(model, layer, shortlist, rank=4) for layer in (1, 2)]
    lm = SimpleNamespace(model=model, heads=heads, codec=ByteCodec())
    texts = ["hello world, this is a test", "another text with some letters"]
    out = corpus_teacher_forced(lm, split=2, texts=texts, taus=[0.0, 1.0])
    assert out["exited 1"] == 0.0 and out["cloud rate 1"] == 1.0
    assert out["exit agreement 1"] is None
    # independent count at tau 0: first head whose top class is a token answers
    exited = agreed = tokens = 0
    with torch.no_grad():
        for text in texts:
            ids = lm.codec.encode(text)
            h = model.embed(torch.tensor(ids))
            kv = model.new_kv()
            h1 = model.run_sequence(h, kv, 0, 0, 1)
            h2 = model.run_sequence(h1, kv, 0, 1, 2)
            full = model.run_sequence(h2, kv, 0, 2, model.cfg.n_layers)
            argmax = model.logits(full[:-1]).float().argmax(-1)
            d1 = decide(heads[0](h1[:-1]), shortlist, 0.0)
            d2 = decide(heads[1](h2[:-1]), shortlist, 0.0)
            tok = torch.where(d1.confident, d1.token, d2.token)
            took = d1.confident | d2.confident
            exited += int(took.sum())
            agreed += int((took & (tok == argmax)).sum())
            tokens += len(ids) - 1
    assert out["tokens"] == tokens
    assert out["exited 0"] == pytest.approx(exited / tokens)
    assert out["exit agreement 0"] == pytest.approx(agreed / exited)
    # transport: fp16 states cost about what the exact states do; all finite
    assert out["fp16"] == pytest.approx(out["cloud-only"], rel=1e-2)
    assert all(math.isfinite(out[k]) for k in ("cloud-only", "fp16", "int8"))
    assert vocab > 64


def test_report_renders_the_corpus_table_and_served_stream_column():
    from bench.collab_report import render
    from tests.bench.test_collab import _fake_data

    data = _fake_data()
    data["bpc"] = {
        "cloud-only": 1.1,
        "fp16": 1.1001,
        "int8": 1.13,
        "exited 0.8": 0.25,
        "cloud rate 0.8": 0.75,
        "exit agreement 0.8": 0.9,
        "exited 1": 0.0,
        "cloud rate 1": 1.0,
        "exit agreement 1": None,
        "texts": 3,
        "tokens": 100,
    }
    md = render(data)
    assert "bits/char (served stream)" in md
    assert "## Teacher-forced on corpus text" in md
    assert "| 0.8 | 25.0% | 90.0% | 75.0% |" in md
    assert "| 1.100 | 1.100 | 1.130 |" in md
