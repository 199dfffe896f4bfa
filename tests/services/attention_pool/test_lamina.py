"""Lamina's traffic, minimum-bandwidth formula and roofline (papers.md section 3)."""

from __future__ import annotations

import math

import pytest

from services.attention_pool.lamina import (
    H20,
    H100,
    LINK_10G,
    LINK_400G,
    LLAMA3_70B,
    QWEN15,
    ModelShape,
    atime,
    attention_bound,
    bandwidth_plateau,
    bandwidth_row,
    bandwidth_table,
    bytes_per_step,
    bytes_per_token_per_layer,
    evaluate,
    max_batch_by_kv,
    min_bandwidth,
    mtime,
    traffic_formula,
)
from tandem.runtime.config import ArchConfig

QWEN15_HF = {  # model_cache/converted/qwen15/config.json, the fields ArchConfig reads
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "max_window_layers": 28,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def test_qwen15_shape_matches_arch_config():
    shape = ModelShape.from_arch(ArchConfig.from_hf(QWEN15_HF), "qwen15")
    assert shape == QWEN15
    assert shape.group == 6
    assert 1.5e9 < shape.n_params < 1.6e9


def test_traffic_breakdown_qwen15():
    t = bytes_per_token_per_layer(QWEN15)
    assert (t.q_bytes, t.k_bytes, t.v_bytes, t.out_bytes) == (3072, 512, 512, 3072)
    assert t.sent == 4096 and t.received == 3072
    assert t.total == 7168 == t.formula  # (2 + 2/6) * 2 * 1536
    assert bytes_per_step(QWEN15, 1) == 7168 * 28


def test_traffic_llama3_70b_matches_formula():
    t = bytes_per_token_per_layer(LLAMA3_70B)
    assert t.total == t.formula == (2 + 2 / 8) * 2 * 8192 == 36864


def test_traffic_gpt2_small_fp32_is_144_kib_per_token():
    # papers.md 3.5: G = 1, fp32: 4 * 4 * 768 * 12 bytes per token per step
    gpt2 = ModelShape("gpt2", 768, 12, 12, 12, 64, 124e6, elem_bytes=4)
    assert bytes_per_step(gpt2, 1) == 4 * 4 * 768 * 12 == 144 * 1024


def test_exact_traffic_differs_when_heads_times_head_dim_is_not_d():
    # gemma-3-270m: d 640, 4 query heads and 1 kv head of 256
    gemma = ModelShape("gemma3", 640, 18, 4, 1, 256, 0.27e9)
    t = bytes_per_token_per_layer(gemma)
    assert t.formula == (2 + 2 / 4) * 2 * 640 == 3200
    assert t.total == (1024 + 256 + 256 + 1024) * 2 == 5120
    assert t.total != t.formula


def test_min_bandwidth_by_hand():
    bw = min_bandwidth(e=2, d=8192, group=8, batch=10, n_layers=80, alpha=0.5, mtime_s=0.03,
                       atime_s=0.01)  # fmt: skip
    assert bw == pytest.approx(2.25 * 2 * 8192 * 10 * 80 / (0.5 * 0.04))
    assert traffic_formula(8192, 8, 2) == 36864
    with pytest.raises(ValueError):
        min_bandwidth(2, 8192, 8, 10, 80, 0.0, 0.03, 0.01)


def test_roofline_times():
    # batch 1 is memory bound: weights once per step
    assert mtime(LLAMA3_70B, H100, 1) == pytest.approx(140e9 / 3.35e12)
    # batch 1000 is compute bound: 2 N B FLOPs
    assert mtime(LLAMA3_70B, H100, 1000) == pytest.approx(2 * 70e9 * 1000 / 989e12)
    assert mtime(LLAMA3_70B, H100, 1000, n_devices=2) == pytest.approx(
        mtime(LLAMA3_70B, H100, 1000) / 2
    )
    # KV per token: 2 * 8 * 128 * 2 bytes * 80 layers
    assert LLAMA3_70B.kv_bytes_per_token == 327680
    assert atime(LLAMA3_70B, H20, 300, 4096) == pytest.approx(300 * 4096 * 327680 / 4.0e12)


def test_max_batch_by_kv_matches_paper():
    # papers.md 3.1: at context 8192 a full H100 holds KV for only ~30 requests
    assert max_batch_by_kv(LLAMA3_70B, H100.mem_bytes, 8192) == 29
    assert max_batch_by_kv(LLAMA3_70B, H20.mem_bytes, 8192) == 35
    assert max_batch_by_kv(LLAMA3_70B, H100.mem_bytes, 8192, reserved_bytes=90e9) == 0


def test_llama3_70b_needs_under_30_gb_per_s_at_batch_300():
    # papers.md 3.1: alpha 0.2, H100 (model) + H20 (attention): < 30 GB/s at batch 300.
    # Assumptions: roofline MTIME/ATIME at peak, one device each (DOP (1, 1)), context 8192
    # (the context papers.md 3.1 quotes). At l = 4096 the same roofline gives ~30.9 GB/s.
    (row,) = evaluate(LLAMA3_70B, batches=(300,), context=8192, alpha=0.2)
    assert row.bw_min < 30e9
    assert row.bw_min == pytest.approx(18.15e9, rel=0.01)
    assert row.fits(LINK_400G.name) and not row.fits(LINK_10G.name)
    (row4k,) = evaluate(LLAMA3_70B, batches=(300,), context=4096, alpha=0.2)
    assert row4k.bw_min == pytest.approx(30.9e9, rel=0.01)


def test_bandwidth_grows_with_batch_to_a_plateau():
    rows = evaluate(LLAMA3_70B, batches=(1, 8, 32, 200, 300, 100_000), context=4096)
    bws = [r.bw_min for r in rows]
    assert all(a < b for a, b in zip(bws[:4], bws[1:5], strict=True))
    # past B* = e * flops / (2 mem_bw) ~ 295 on an H100 MTIME is compute bound: flat from there
    plateau = bandwidth_plateau(LLAMA3_70B, 4096, 0.2)
    assert bws[4] == pytest.approx(plateau) and bws[5] == pytest.approx(plateau)
    bound = attention_bound(LLAMA3_70B, H20, 4096, 0.2)
    assert bound == pytest.approx(9 * 4.0e12 / (0.2 * 4096))
    assert plateau < bound


def test_more_devices_raise_aggregate_but_split_per_device():
    (one,) = evaluate(LLAMA3_70B, batches=(300,), context=4096)
    (dop,) = evaluate(LLAMA3_70B, batches=(300,), context=4096, n_model_devices=2,
                      n_attn_devices=4)  # fmt: skip
    assert dop.bw_min > one.bw_min
    assert dop.bw_per_attn_device == pytest.approx(dop.bw_min_exact / 4)
    assert dop.step_bytes == one.step_bytes


def test_measured_times_row_and_table():
    row = bandwidth_row(QWEN15, batch=8, mtime_s=0.050, atime_s=0.010, alpha=0.2)
    assert row.bw_min == pytest.approx(7168 * 8 * 28 / (0.2 * 0.060))
    assert math.isclose(row.bw_min, row.bw_min_exact)
    table = bandwidth_table([row, *evaluate(QWEN15)])
    lines = table.splitlines()
    assert len(lines) == 2 + 1 + 4
    assert lines[0].startswith("| model | B |") and "400 Gbit/s" in lines[0]
