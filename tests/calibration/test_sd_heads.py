"""sd_heads --replace: a retrained exit keeps the artifact's heads at the other layers."""

from __future__ import annotations

import torch

from tandem.calibration.sd_heads import with_kept_heads
from tandem.runtime.exit_head import ExitHead, ExitHeadConfig, load_heads, save_heads
from tests.tiny import tiny_model


def _head(model, layer: int, rank: int, k: int, seed: int) -> ExitHead:
    head = ExitHead(ExitHeadConfig(layer, model.cfg.hidden_size, rank, k), 1e-6, False)
    head.shortlist.copy_(torch.arange(k))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    head.attach_lm_head(model.lm_head.weight)
    return head.to(torch.bfloat16).eval()


def test_replaced_head_keeps_the_others(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "m.pt"
    old = [_head(model, 1, 4, 8, 1), _head(model, 2, 4, 8, 2), _head(model, 3, 4, 8, 3)]
    save_heads(old, path, {"rows": 100, "base_prompts": 10})
    new = _head(model, 2, 8, 16, 4)  # another rank and shortlist, as for qwen05's L18
    meta = {"rows": 200}
    merged = with_kept_heads(path, [new], meta, model)
    save_heads(merged, path, meta)
    eps, unit = model.cfg.rms_eps, model.cfg.norm_unit_offset
    loaded, got_meta = load_heads(path, model.lm_head.weight, eps, unit, torch.bfloat16)
    assert [(h.cfg.layer, h.cfg.rank, h.cfg.shortlist_size) for h in loaded] == [
        (1, 4, 8),
        (2, 8, 16),
        (3, 4, 8),
    ]
    for got, want in zip(loaded, [old[0], new, old[2]], strict=True):
        for k, v in want.trained_state().items():
            assert torch.equal(got.trained_state()[k].to(v.dtype), v), k
    assert got_meta["exit_layers"] == [1, 2, 3]
    assert [(k["layer"], k["rows"]) for k in got_meta["kept_heads"]] == [(1, 100), (3, 100)]
