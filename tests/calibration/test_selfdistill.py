"""Self-distillation data, calibrated exit heads and their consistency classifier, on a
tiny random decoder."""

from __future__ import annotations

import torch

from tandem.calibration.consistency import (
    calibrated_copy,
    choose_shortlist,
    fit_consistency,
    soft_targets,
    split_by_prompt,
)
from tandem.calibration.sd_heads import evaluate
from tandem.calibration.selfdistill import TOP_K, Features, collect
from tandem.calibration.train import TrainConfig, make_head, train_head
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import decide, load_heads, save_heads, with_top_probability
from tandem.runtime.generate import generate
from tandem.runtime.sampling import SamplingParams
from tests.tiny import tiny_model

EXITS = (1, 2, 3)
EOS = frozenset({2})


def _model():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def _prompts(n: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (int(4 + i % 5),), generator=g).tolist() for i in range(n)]


def test_answers_are_full_depth_greedy_and_rows_line_up():
    model = _model()
    prompts = _prompts(5)
    feats, answers = collect(model, prompts, EXITS, max_new=6, eos_ids=EOS, batch=3)
    for p, a in zip(prompts, answers, strict=True):
        want = generate(
            ExitDecoder(model), p, SamplingParams(max_tokens=6, temperature=0.0), eos_ids=EOS
        )
        assert list(want.token_ids) == a
    n_prompt = sum(len(p) - 1 for p in prompts)
    n_answer = sum(len(a) - 1 for a in answers)  # the last token is never fed back
    assert feats.n == n_prompt + n_answer
    assert int(feats.is_answer.sum()) == n_answer
    assert feats.top_ids.shape == (feats.n, TOP_K)
    assert [h.shape[0] for h in feats.hidden] == [feats.n] * len(EXITS)
    # an answer row's final argmax is the token generated next in its sequence
    first = feats.is_answer & (feats.seq_index == 0)
    assert feats.final_argmax[first].tolist() == answers[0][1:]


def test_collecting_on_a_compiled_model_records_the_eager_rows():
    """`--engine compiled`: the same model compiled (static slots, a graph per layer range
    between the exits) records the same answers and rows as the eager reference."""
    eager, fast = _model(), _model()
    fast.compile_decode(3)
    prompts = _prompts(5)
    ref, answers = collect(eager, prompts, EXITS, max_new=6, eos_ids=EOS, batch=3)
    got, got_answers = collect(fast, prompts, EXITS, max_new=6, eos_ids=EOS, batch=3)
    assert fast.compiled is not None and (1, 2) in fast.compiled._graphs
    assert got_answers == answers
    assert torch.equal(got.seq_index, ref.seq_index) and torch.equal(got.is_answer, ref.is_answer)
    assert torch.equal(got.final_argmax, ref.final_argmax)
    torch.testing.assert_close(got.top_p, ref.top_p, atol=1e-4, rtol=1e-4)
    for g, r in zip(got.hidden, ref.hidden, strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=1e-2, rtol=1e-2)
    assert fast.compiled.pool.free == 3  # every slot given back


def test_with_top_probability_sets_the_top_and_keeps_the_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 33, generator=g) * 3
    c = torch.rand(64, generator=g) * 0.98 + 0.01
    out = with_top_probability(logits, c)
    top_tok = logits[:, :-1].argmax(-1)
    assert torch.equal(out[:, :-1].argmax(-1), top_tok)
    token_top = logits[:, :-1].amax(-1) >= logits[:, -1]
    p = out.softmax(-1)
    got = p.gather(1, top_tok[:, None]).squeeze(1)
    torch.testing.assert_close(got[token_top], c[token_top], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[~token_top], logits[~token_top])
    # "other" (every token outside the shortlist) never drops to 0; where the top token
    # had to rise (c above its share among the tokens), the rest keep their proportions
    assert bool((p[token_top, -1] > 1e-6).all())
    raised = token_top & (logits[:, :-1].softmax(-1).amax(-1) < c)
    assert 0 < int(raised.sum()) < int(token_top.sum())  # both cases are exercised
    raw = logits.softmax(-1)[raised]
    raw_top = raw.gather(1, top_tok[raised, None]).squeeze(1)
    want_other = (1 - c[raised]) * raw[:, -1] / (1 - raw_top)
    torch.testing.assert_close(p[raised, -1], want_other, atol=1e-5, rtol=1e-3)


def _trained(model, feats):
    shortlist = choose_shortlist(feats, 96, model.cfg.vocab_size, eos_ids=(2,))
    targets = soft_targets(feats, shortlist, model.cfg.vocab_size)
    tr, va = split_by_prompt(feats.seq_index, (0.3,), 0)
    heads = []
    for layer, hidden in zip(feats.layers, feats.hidden, strict=True):
        head = make_head(model, layer, shortlist, 8)
        train_head(head, hidden, targets, tr, va, TrainConfig(rank=8, max_epochs=2))
        calib = calibrated_copy(head)
        fit_consistency(calib, hidden[va], feats.final_argmax[va])
        heads.append(calib)
    return shortlist, targets, heads


def test_soft_targets_and_calibrated_heads_round_trip(tmp_path):
    model = _model()
    feats, _ = collect(model, _prompts(30), EXITS, max_new=8, eos_ids=EOS, batch=8)
    shortlist, targets, heads = _trained(model, feats)
    assert shortlist[0] == 2 and shortlist.unique().numel() == 96
    sums = targets.dense().float().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=3e-3)
    assert any(float(h.conf_hidden.detach().abs().sum()) > 0 for h in heads)
    path = tmp_path / "h.pt"
    save_heads(heads, path, {"model": "tiny"})
    cfg = model.cfg
    loaded, _ = load_heads(
        path, model.lm_head.weight, cfg.rms_eps, cfg.norm_unit_offset, torch.float32
    )
    x = feats.hidden[1][:10].float()
    torch.testing.assert_close(loaded[1](x), heads[1](x))
    d = decide(loaded[1](x), loaded[1].shortlist, 0.0)
    assert ((d.prob > 0) & (d.prob < 1)).all()
    ev = evaluate(loaded, feats, split=2)
    assert [c["tau"] for c in ev["cascade"]] and len(ev["cascade_split"][0]["exit_fraction"]) == 2


def test_consistency_classifier_beats_the_base_rate():
    model = _model()
    feats, _ = collect(model, _prompts(40), EXITS, max_new=8, eos_ids=EOS, batch=8)
    shortlist = choose_shortlist(feats, 96, model.cfg.vocab_size, eos_ids=(2,))
    head = calibrated_copy(make_head(model, 3, shortlist, 8))
    stats = fit_consistency(head, feats.hidden[2], feats.final_argmax)
    p = stats["base_rate"]
    base_nll = -(p * torch.log(torch.tensor(p)) + (1 - p) * torch.log(torch.tensor(1 - p)))
    assert 0 < p < 1 and stats["nll"] < float(base_nll)


def test_features_save_load(tmp_path):
    model = _model()
    feats, _ = collect(model, _prompts(3), EXITS, max_new=3, eos_ids=EOS, batch=3)
    feats.save(tmp_path / "f.pt")
    back = Features.load(tmp_path / "f.pt")
    assert torch.equal(back.top_ids, feats.top_ids) and back.layers == feats.layers


def test_report_renders_every_table(tmp_path):
    import copy
    import json

    from tandem.calibration.report_sd import write

    model = _model()
    feats, _ = collect(model, _prompts(30), EXITS, max_new=8, eos_ids=EOS, batch=8)
    _, _, heads = _trained(model, feats)
    ev = evaluate(heads, feats, split=2)
    entry = {
        "upstream": "tiny",
        "artifact": {"path": "x.pt", "bytes": 1000},
        "shortlist_size": 96,
        "rank": 8,
        "train": {
            "rows": feats.n,
            "answer_rows": 1,
            "prompts": 30,
            "coverage_train": 0.9,
            "train_s": 1.0,
            "heads": [{"layer": e} for e in EXITS],
        },
        "eval": {**ev, "quant": "bf16", "prompts": 30},
        "freerun": {
            "split": None,
            "prompts": 2,
            "max_new": 4,
            "quant": "bf16",
            "heads": [1, 2, 3],
            "threads": 1,
            "rows": [
                {
                    "tau": 1.0,
                    "tok_per_s": 10.0,
                    "speedup": 1.0,
                    "exited": 0.0,
                    "exited_agreement": None,
                    "by_layer": {},
                    "identical_answers": 1.0,
                }
            ],
        },
    }
    served = copy.deepcopy(entry["freerun"])  # a compiled run with decode-only timing
    served.update(engine="compiled", eager_heads=False, head_ms={"L3": 0.25})
    served["rows"][0].update(decode_tok_per_s=12.5, decode_speedup=1.0)
    entry["freerun_compiled"] = served
    (tmp_path / "exits_sd.json").write_text(json.dumps({"models": {"tiny": entry}}))
    write(tmp_path)
    text = (tmp_path / "exits.md").read_text()
    assert "## tiny (self-distilled)" in text and "Reliability" in text
    assert "Split edge (heads up to layer 2 only)" in text and "Free-running, standalone" in text
    assert "compiled decode path and heads" in text
    assert "| 1.00 | 10.0 | 1.00x | 12.5 | 1.00x |" in text  # decode-only columns
    assert "Head cost per call in this run (one row, as the decoder calls it): L3 0.25 ms." in text
