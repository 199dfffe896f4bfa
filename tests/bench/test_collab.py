"""Pure helpers of `make bench-collab` (bench/collab.py, bench/collab_report.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from bench.collab import _order, _per_client, dumps, instruction, plan
from bench.collab_report import Run, agreement, cloud_layer_rows, headline, offload, render
from tandem.data.corpus import TextSample


def test_cloud_layer_rows_per_mode():
    # prompt of 10 tokens, 4 new tokens; token j comes from position 9 + j
    src = ["edge", "cloud", "edge", "edge"]
    assert cloud_layer_rows("cloud-only", 10, src, 28, 14) == (10 + 3) * 28
    # CE-CoLLM catches up to the last asked position (10) only: 11 rows x 14 layers
    assert cloud_layer_rows("ce-collm", 10, src, 28, 14) == 11 * 14
    assert cloud_layer_rows("ce-collm", 10, ["edge"] * 4, 28, 14) == 0
    # naive recomputes the whole context for every request
    both = ["cloud", "edge", "cloud", "edge"]
    assert cloud_layer_rows("naive", 10, both, 28, 14) == (10 + 12) * 14
    assert cloud_layer_rows("standalone", 10, src, 28, 14) == 0


def test_agreement_positions_prefix_exact():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    ag = agreement([[1, 2, 9, 4], [5, 6, 7, 8]], ref)
    assert ag["pos"] == pytest.approx((3 / 4 + 1) / 2)
    assert ag["prefix"] == pytest.approx((2 / 4 + 1) / 2)
    assert ag["exact"] == 0.5
    assert agreement(ref, ref) == {"pos": 1.0, "prefix": 1.0, "exact": 1.0}


def test_offload_and_headline():
    ref = Run("cloud-only", "l", None, 1, total_s=10.0, cloud_s=10.0, cloud_layer_rows=100)
    ce = Run("ce-collm", "l", 0.8, 1, total_s=8.0, cloud_s=4.0, cloud_layer_rows=40)
    ce.bytes_up, ce.tokens, ce.cloud_tokens = 10.0, 10, 5
    naive = Run("naive", "l", 0.8, 1, bytes_up=1000.0)
    assert offload(ce, ref) == (pytest.approx(0.6), pytest.approx(0.6))
    assert offload(ref, ref) == (None, None)
    h = headline([ref, ce, naive], "l", 0.8)
    assert h["time_reduction"] == pytest.approx(0.2)
    assert h["bytes_reduction"] == pytest.approx(0.99)
    assert h["cloud_rate"] == 0.5


def test_per_client_means():
    r = Run("ce-collm", "l", 0.8, 2, total_s=10.0, bytes_up=8.0, tokens=64, cloud_tokens=10)
    r.exit_tokens = {"7": 4}
    r = _per_client(r, 2)
    assert (r.total_s, r.bytes_up, r.tokens, r.cloud_tokens) == (5.0, 4.0, 32, 5)
    assert r.exit_tokens == {"7": 2}


def test_plan_and_client_order():
    p = plan(["a", "b"], [0.8, 1.0], [1, 2], 0.8, True, ["a"])
    assert ("naive", "a", 0.8, 1, "fp16") in p and not [x for x in p if x[:2] == ("naive", "b")]
    assert ("ce-collm", "a", 0.8, 1, "int8") in p
    assert ("cloud-only", "a", None, 2, "fp16") in p and ("ce-collm", "a", 0.8, 2, "fp16") in p
    assert sum(x[0] == "standalone" for x in p) == 2
    assert _order(3, 1) == [1, 2, 0]


def test_instruction_per_source():
    assert "'dog'" in instruction(TextSample("wordnet", "dog: a domestic animal"))
    assert "```python" in instruction(TextSample("stdlib", "x = 1\n" * 100))
    assert len(instruction(TextSample("fortunes", "word " * 200))) < 400


def _fake_data() -> dict:
    cfg = {
        "model": "tiny",
        "upstream": "x/tiny",
        "quant": "int4",
        "n_layers": 28,
        "hidden_size": 1536,
        "split": 14,
        "edge_exits": [7, 14],
        "prompts": 2,
        "prompt_tokens_min": 90,
        "prompt_tokens_max": 110,
        "max_tokens": 4,
        "links": ["10mbit/20ms"],
        "taus": [0.8, 1.0],
        "tau_main": 0.8,
        "clients": [1, 2],
        "clients_link": "10mbit/20ms",
        "cloud_speed": 1.1,
        "timeout_s": 60.0,
        "pinned": True,
        "quick": True,
    }
    common = dict(tokens=8, dec_tokens=6, dec_s=1.0, ttft_s=1.0, outputs=[[[1, 2], [3, 4]]])
    runs = [
        Run("cloud-only", "10mbit/20ms", None, 1, total_s=2.0, cloud_s=2.0, **common),
        Run("cloud-only", "10mbit/20ms", None, 2, total_s=3.0, cloud_s=3.0, **common),
        Run("naive", "10mbit/20ms", 0.8, 1, total_s=5.0, cloud_s=3.0, bytes_up=9e5, **common),
        Run("standalone", None, 0.8, 1, total_s=1.0, edge_s=1.0, **common),
        Run("standalone", None, 1.0, 1, total_s=1.0, edge_s=1.0, **common),
    ]
    for tau in (0.8, 1.0):
        runs.append(
            Run(
                "ce-collm",
                "10mbit/20ms",
                tau,
                1,
                total_s=2.2,
                cloud_s=1.0,
                edge_s=1.0,
                comm_s=0.1,
                bytes_up=3e5,
                cloud_tokens=6,
                dec_cloud_tokens=4,
                dec_edge_s=0.3,
                dec_cloud_s=0.4,
                **common,
            )
        )
    runs.append(Run("ce-collm", "10mbit/20ms", 0.8, 1, "int8", total_s=2.1, **common))
    runs.append(Run("ce-collm", "10mbit/20ms", 0.8, 2, total_s=3.1, cloud_tokens=6, **common))
    return {
        "machine": "test",
        "command": "python -m bench.collab --quick",
        "config": cfg,
        "timing": {"wall_s": 60.0},
        "bpc": {"cloud-only": 1.1, "ce-collm fp16 0.8": 1.2, "texts": 3, "tokens": 100},
        "runs": [asdict(r) for r in runs],
    }


def test_render_from_json_round_trip():
    data = json.loads(dumps(_fake_data()))
    md = render(data)
    assert "## Against the paper" in md and "13.8%" in md  # the paper's figure
    assert "Several edge clients" in md and "Why the numbers differ" in md
    assert '"outputs": [[[1, 2], [3, 4]]]' in dumps(_fake_data())
