"""ApiMetrics on explicit registries."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from tandem.api.metrics import ApiMetrics

M = {"model": "m"}


def test_two_instances_on_separate_registries_do_not_clash() -> None:
    a = ApiMetrics(CollectorRegistry(), model_name="m")
    b = ApiMetrics(CollectorRegistry(), model_name="m")
    a.start_request().finish(finish_reason="stop", status=200, prompt_tokens=1, completion_tokens=0)
    sample = {**M, "finish_reason": "stop", "status": "200"}
    assert a.registry.get_sample_value("tandem_edge_requests_total", sample) == 1
    assert b.registry.get_sample_value("tandem_edge_requests_total", sample) is None


def test_recorder_counts_ttft_itl_and_exit_layers() -> None:
    metrics = ApiMetrics(CollectorRegistry(), model_name="m")
    rec = metrics.start_request()
    rec.on_tokens((3,))  # first token: TTFT
    rec.on_tokens((1, 3, 3))  # three tokens in one chunk: three ITL samples
    rec.on_tokens(())  # no tokens: nothing
    rec.finish(finish_reason="length", status=200, prompt_tokens=5, completion_tokens=4)
    rec.finish(finish_reason="length", status=200, prompt_tokens=5, completion_tokens=4)  # no-op
    reg = metrics.registry
    assert reg.get_sample_value("tandem_edge_time_to_first_token_seconds_count", M) == 1
    assert reg.get_sample_value("tandem_edge_inter_token_latency_seconds_count", M) == 3
    assert reg.get_sample_value("tandem_edge_generation_tokens_total", M) == 4
    assert reg.get_sample_value("tandem_edge_prompt_tokens_total", M) == 5
    layer = "tandem_edge_generated_tokens_by_exit_layer_total"
    assert reg.get_sample_value(layer, {**M, "exit_layer": "3"}) == 3
    assert reg.get_sample_value(layer, {**M, "exit_layer": "1"}) == 1
    assert reg.get_sample_value("tandem_edge_requests_in_flight", M) == 0


def test_queue_depth_is_read_at_scrape_and_survives_engine_errors() -> None:
    metrics = ApiMetrics(CollectorRegistry(), model_name="m")
    depth = [2]

    def queue_depth() -> int:
        if depth[0] < 0:
            raise RuntimeError("engine gone")
        return depth[0]

    metrics.bind_engine(queue_depth, n_layers=12)
    reg = metrics.registry
    assert reg.get_sample_value("tandem_edge_queue_depth", M) == 2
    depth[0] = 7
    assert reg.get_sample_value("tandem_edge_queue_depth", M) == 7
    depth[0] = -1
    assert math.isnan(reg.get_sample_value("tandem_edge_queue_depth", M) or 0.0)
    assert reg.get_sample_value("tandem_edge_model_layers", M) == 12
