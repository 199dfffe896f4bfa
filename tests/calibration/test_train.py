"""Exit-head calibration on a tiny random decoder: collect, distil, save/load, evaluate."""

from __future__ import annotations

import torch

from tandem.calibration.collect import (
    choose_shortlist,
    collect_activations,
    shortlist_targets,
)
from tandem.calibration.evaluate import evaluate_heads, render_markdown
from tandem.calibration.train import TrainConfig, make_head, mean_kl, split_by_text, train_head
from tandem.runtime.exit_head import load_heads, save_heads
from tandem.runtime.model import DecoderModel
from tests.tiny import tiny_model

EXITS = (1, 2, 3)
EOS = 2  # tests.tiny's llama config


def peaky_tiny_model() -> DecoderModel:
    model = tiny_model("llama")
    with torch.no_grad():  # a peakier final distribution than the default init gives
        model.lm_head.weight.mul_(4.0)
    return model


def tiny_data(model: DecoderModel, n_texts: int = 40):
    gen = torch.Generator().manual_seed(1)
    seqs = [
        torch.randint(
            0, 256, (int(torch.randint(12, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n_texts)
    ]
    acts = collect_activations(model, seqs, EXITS, batch_tokens=256)
    shortlist = choose_shortlist(acts, 96, eos_ids=(EOS,))
    return seqs, acts, shortlist, shortlist_targets(model, acts, shortlist)


def test_collect_shapes_and_shortlist() -> None:
    model = peaky_tiny_model()
    seqs, acts, shortlist, targets = tiny_data(model)
    n = acts.n_tokens
    assert n == sum(len(s) - 1 for s in seqs)  # every position but the first
    assert [h.shape for h in acts.hidden] == [(n, 64)] * len(EXITS)
    assert shortlist[0] == EOS and shortlist.unique().numel() == shortlist.numel() == 96
    distinct = acts.final_argmax.unique()
    if distinct.numel() < 96:  # every predicted token fits, the rest is filled up
        assert torch.isin(distinct, shortlist).all()
    assert targets.shape == (n, 97) and targets.dtype == torch.float16
    sums = targets.float().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=3e-3)
    ref = torch.softmax(model.logits(acts.final[:5]).float(), -1)[:, shortlist]
    assert torch.allclose(targets[:5, :-1].float(), ref, atol=1e-3)


def test_training_reduces_kl_and_round_trips(tmp_path) -> None:
    model = peaky_tiny_model()
    _, acts, shortlist, targets = tiny_data(model)
    cfg = TrainConfig(rank=16, max_epochs=6, batch_size=64, patience=6, warmup_steps=5)
    train_rows, val_rows = split_by_text(acts.text_index, cfg.val_fraction, cfg.seed)
    assert not set(acts.text_index[train_rows].tolist()) & set(acts.text_index[val_rows].tolist())

    heads = []
    for layer, hidden in zip(EXITS, acts.hidden, strict=True):
        torch.manual_seed(layer)
        head = make_head(model, layer, shortlist, cfg.rank)
        before = mean_kl(head, hidden, targets, train_rows)
        stats = train_head(head, hidden, targets, train_rows, val_rows, cfg)
        after = mean_kl(head, hidden, targets, train_rows)
        assert after < 0.7 * before, (layer, before, after)
        assert stats["val_kl"] < stats["val_kl_init"]
        heads.append(head)

    path = tmp_path / "tiny.pt"
    save_heads(heads, path, {"model": "tiny", "shortlist_size": 96})
    blob = torch.load(path, weights_only=True)
    assert not any(k.startswith("proj.") for k in blob["heads"][0]["state"])  # only trained
    loaded, meta = load_heads(
        path, model.lm_head.weight, model.cfg.rms_eps, model.cfg.norm_unit_offset, torch.float32
    )
    assert meta["model"] == "tiny"
    h = torch.randn(7, 64) * 3
    for a, b in zip(heads, loaded, strict=True):
        assert torch.equal(a.shortlist, b.shortlist)
        assert torch.equal(a(h), b(h))

    result = evaluate_heads(model, loaded, acts)
    assert [e["layer"] for e in result["exits"]] == list(EXITS)
    for t in result["tau"]:
        assert sum(t["exit_fraction"]) <= t["exited"] + 1e-3
        assert 0.0 <= t["layer_savings"] <= 1.0
    assert result["tau"][-1]["tau"] == 1.0 and result["tau"][-1]["exited"] == 0.0
    for e in result["exits"]:
        assert sum(b["count"] for b in e["calibration"]) == result["tokens"]
    entry = {
        "upstream": "tiny",
        "n_layers": 4,
        "exit_layers": list(EXITS),
        "shortlist_size": 96,
        "rank": cfg.rank,
        "artifact": {"path": str(path), "bytes": path.stat().st_size},
        "train": {
            "tokens": acts.n_tokens,
            "texts": acts.n_texts,
            "val_tokens": 1,
            "heads": [{"val_kl_init": 1.0, "val_kl": 0.5} for _ in EXITS],
        },
        "eval": result,
    }
    md = render_markdown({"machine": "test", "models": {"tiny": entry}})
    assert "## tiny" in md and "## Measured speed-up (decoder)" in md


def test_training_is_reproducible() -> None:
    model = peaky_tiny_model()
    _, acts, shortlist, targets = tiny_data(model, n_texts=16)
    cfg = TrainConfig(rank=8, max_epochs=2, batch_size=32, warmup_steps=2)
    rows = split_by_text(acts.text_index, cfg.val_fraction, cfg.seed)
    states = []
    for _ in range(2):
        torch.manual_seed(5)
        head = make_head(model, 2, shortlist, cfg.rank)
        train_head(head, acts.hidden[1], targets, *rows, cfg)
        states.append(head.trained_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
