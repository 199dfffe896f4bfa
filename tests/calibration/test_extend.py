"""Resumable extension of a self-distillation cache (tandem.calibration.extend) and the
split that keeps the base cache's test prompts (consistency.split_extended)."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.calibration.consistency import split_by_prompt, split_extended
from tandem.calibration.extend import (
    extras_dir,
    list_parts,
    load_with_extras,
    new_prompts,
)
from tandem.calibration.selfdistill import TOP_K, Features


def _feats(first_prompt: int, n_prompts: int, rows_per: int = 3, d: int = 4) -> Features:
    seq = torch.arange(first_prompt, first_prompt + n_prompts).repeat_interleave(rows_per)
    n = seq.shape[0]
    return Features(
        (1, 2),
        [torch.randn(n, d).bfloat16(), torch.randn(n, d).bfloat16()],
        torch.randint(0, 50, (n, TOP_K)),
        torch.rand(n, TOP_K),
        torch.arange(n) % 2 == 0,
        seq,
    )


def _write_base(tmp_path, n_prompts: int):
    base = tmp_path / "m.train.pt"
    _feats(0, n_prompts).save(base)
    meta = {"prompts": n_prompts, "prompt_texts": [f"p{i}" for i in range(n_prompts)]}
    base.with_suffix(".json").write_text(json.dumps(meta))
    return base


def _write_part(base, first: int, n: int, base_prompts: int) -> None:
    d = extras_dir(base)
    d.mkdir(exist_ok=True)
    _feats(base_prompts + first, n).save(d / f"part-{first:05d}.pt")
    info = {"first_prompt": first, "prompt_texts": [f"x{first + i}" for i in range(n)]}
    (d / f"part-{first:05d}.json").write_text(json.dumps(info))


def test_new_prompts_skip_existing_and_repeats():
    assert new_prompts(["a", "b", "c", "b", "d", "a"], ["a"]) == ["b", "c", "d"]


def test_base_and_parts_concatenate_in_order(tmp_path):
    base = _write_base(tmp_path, 5)
    assert extras_dir(base).name == "m.train.extra"
    feats, n = load_with_extras(base)
    assert n == 5 and feats.n == 15
    _write_part(base, 0, 2, 5)
    _write_part(base, 2, 3, 5)
    (extras_dir(base) / "part-00005.pt.tmp").write_bytes(b"unfinished")  # a kill mid-save
    feats, n = load_with_extras(base)
    assert n == 5 and feats.n == 30
    assert feats.seq_index.tolist() == sorted(feats.seq_index.tolist())
    assert int(feats.seq_index.max()) == 9
    assert len(load_with_extras(base, max_parts=1)[0].seq_index.unique()) == 7
    assert [p.first_prompt for p in list_parts(extras_dir(base))] == [0, 2]


def test_a_gap_in_the_parts_is_an_error(tmp_path):
    base = _write_base(tmp_path, 5)
    _write_part(base, 0, 2, 5)
    _write_part(base, 3, 2, 5)
    with pytest.raises(ValueError, match="expected 2"):
        list_parts(extras_dir(base))


def test_split_extended_keeps_the_base_split():
    base_prompts = 40
    seq = torch.arange(100).repeat_interleave(2)
    before = split_by_prompt(seq[: 2 * base_prompts], (0.1, 0.1), 0)
    after = split_extended(seq, base_prompts, (0.1, 0.1), (0.1, 0.0), 0)
    base_rows = [p[p < 2 * base_prompts] for p in after]
    for a, b in zip(before, base_rows, strict=True):
        assert torch.equal(a, b)
    # the test part is only base prompts; extra prompts go to train / val, 90 / 10
    assert bool((seq[after[2]] < base_prompts).all())
    extra_val = seq[after[1]][seq[after[1]] >= base_prompts].unique()
    assert extra_val.numel() == 6
    every = torch.cat(after).sort().values
    assert torch.equal(every, torch.arange(seq.shape[0]))
    # no prompt is in two parts
    owners = [set(seq[p].tolist()) for p in after]
    assert not (owners[0] & owners[1]) and not (owners[0] & owners[2])
