"""The bench-edge / bench-batch reports, rendered from synthetic results (the benches
themselves need the real models and the side venvs: `make bench-edge`, `make bench-batch`)."""

from __future__ import annotations

from dataclasses import asdict

from bench import batch, edge


def _edge_data(cpp_missing: bool = False) -> dict:
    ours = edge.Side(decode_tok_s=60.0, prefill_tok_s=900.0, rss_mb=400.0, bytes_per_token=1e8)
    cpp = edge.Side(decode_tok_s=30.0, prefill_tok_s=1800.0, rss_mb=300.0, bytes_per_token=2e8)
    if cpp_missing:
        cpp = edge.Side(error="llama.cpp NOT RUN: .venv-llamacpp is missing")
    row = edge.EdgeRow("smollm2", "int4", 1.0, True, ours, cpp, agreement=0.5, bpc=1.1)
    return {
        "machine": "test cpu",
        "bandwidth_gbs": 20.0,
        "bandwidth_before_gbs": 19.0,
        "bandwidth_after_gbs": 20.0,
        "settings": {
            "threads": 2,
            "new_tokens": 64,
            "prefill_tokens": 512,
            "repeats": 3,
            "compiled": True,
            "quality_texts": 4,
        },
        "rows": [asdict(row)],
    }


def test_edge_report_ratios_and_bandwidth_fraction():
    md = edge.render(_edge_data())
    row = next(line for line in md.splitlines() if line.startswith("| smollm2 | int4"))
    assert "**2.00×**" in row  # decode 60 / 30
    assert "0.50×" in row  # prefill 900 / 1800
    # 1e8 bytes/token * 60 tok/s = 6 GB/s = 30% of 20 GB/s; llama.cpp 2e8 * 30 = 6 GB/s too
    bw = next(line for line in md.splitlines() if line.startswith("| smollm2 | 100.0"))
    assert "| 6.0 | 30% |" in bw
    assert "did not run" not in md


def test_edge_rounds_report_median_ratio_of_rounds():
    """Three rounds: the decode ratio is the median of the rounds' own ratios, the tok/s
    columns the medians of each side; each round's ratio is listed."""
    data = _edge_data()
    row = edge._row_from_json(data["rows"][0])
    for ours, cpp in ((50.0, 40.0), (90.0, 30.0)):  # rounds 2, 3 (round 1: 60 / 30)
        again = edge._row_from_json(data["rows"][0])
        again.ours.decode_tok_s, again.cpp.decode_tok_s = ours, cpp
        row.add_round(again)
    assert row.decode_rounds == [[60.0, 30.0], [50.0, 40.0], [90.0, 30.0]]
    assert row.ratio("decode_tok_s") == 2.0  # median of 2.0, 1.25, 3.0
    assert (row.ours.decode_tok_s, row.cpp.decode_tok_s) == (60.0, 30.0)
    data["rows"] = [asdict(row)]
    data["settings"]["rounds"] = 3
    md = edge.render(data)
    assert "**2.00×**" in md and "1.25× (50.0 / 40.0)" in md and "3.00× (90.0 / 30.0)" in md
    assert "ran 3 times" in md


def test_edge_report_says_loudly_when_llamacpp_did_not_run():
    md = edge.render(_edge_data(cpp_missing=True))
    assert "**smollm2: llama.cpp NOT RUN" in md
    row = next(line for line in md.splitlines() if line.startswith("| smollm2 | int4"))
    assert "**—**" in row  # no ratio


def test_edge_plot_writes_png(tmp_path):
    edge.plot(_edge_data(), tmp_path / "edge.png")
    assert (tmp_path / "edge.png").stat().st_size > 1000


def _batch_data() -> dict:
    def side(rates: dict[int, float], **extra) -> dict:
        results = [
            {"batch": b, "decode_tok_s": t, "warmup_s": 1.0, "tokens": [[1, 2]] * b, **extra}
            for b, t in rates.items()
        ]
        return {"load_s": 1.0, "results": results, "rss_mb": 100.0}

    return {
        "machine": "test cpu",
        "bandwidth_gbs": 20.0,
        "bandwidth_before_gbs": 20.0,
        "bandwidth_after_gbs": 20.0,
        "vllm_version": "0.32.0",
        "settings": {
            "threads": 2,
            "new_tokens": 64,
            "prompt_tokens": 32,
            "batch_sizes": [1, 8],
            "repeats": 3,
            "compiled": True,
            "vllm_eager": False,
        },
        "rows": [
            {
                "model": "qwen05",
                "quant": "int4",
                "tau": 1.0,
                "ours": side({1: 40.0, 8: 160.0}, bytes_per_step=3e8),
                "vllm": side({1: 20.0, 8: 40.0}),
                "vllm_bytes_per_step": 1e9,
                "agreement": {"1": 1.0, "8": 0.5},
                "ours_error": None,
                "vllm_error": None,
            }
        ],
    }


def test_batch_report_ratios_and_bytes_per_second(tmp_path):
    data = _batch_data()
    md = batch.render(data)
    row = next(line for line in md.splitlines() if line.startswith("| qwen05 | int4"))
    assert "2.00×" in row and "**4.00×**" in row
    # B=8: ours 3e8 B/step * 160/8 steps/s = 6 GB/s (30%); vLLM 1e9 * 40/8 = 5 GB/s (25%)
    bw = next(line for line in md.splitlines() if line.startswith("| qwen05 | 300.0"))
    assert "| 6.0 | 30% |" in bw and "| 5.0 | 25% |" in bw
    assert "did not run" not in md
    batch.plot(data, tmp_path / "batch.png")
    assert (tmp_path / "batch.png").stat().st_size > 1000


def test_batch_report_names_a_missing_side():
    data = _batch_data()
    data["rows"][0]["vllm"] = None
    data["rows"][0]["vllm_error"] = "vLLM NOT RUN: .venv-vllm is missing"
    md = batch.render(data)
    assert "**qwen05: vLLM NOT RUN" in md
