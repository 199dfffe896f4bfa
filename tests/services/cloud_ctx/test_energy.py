"""The cloud's per-request energy accounting (CloudServicer._energy) and its metrics, with a
fake meter; --device parsing (auto on this machine, cuda without a GPU refused)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from services.cloud_ctx.grpc_server import CloudServicer
from services.cloud_ctx.metrics import CloudMetrics


class FakeMeter:
    source = "measured:fake"

    def __init__(self) -> None:
        self.j = 10.0

    def read_joules(self) -> float:
        return self.j


def test_batch_energy_is_shared_by_its_requests():
    metrics = CloudMetrics(CollectorRegistry(), model_name="m")
    meter = FakeMeter()
    servicer = CloudServicer(manager=None, metrics=metrics, meter=meter)  # type: ignore[arg-type]
    j0 = servicer._joules()
    meter.j += 3.0  # the batched forward
    servicer._energy("NextToken", j0, 3)
    reg = metrics.registry
    labels = {"model": "m", "source": "measured:fake"}
    assert reg.get_sample_value("tandem_cloud_energy_joules_total", labels) == 3.0
    h = {**labels, "rpc": "NextToken"}
    assert reg.get_sample_value("tandem_cloud_request_energy_joules_count", h) == 3
    assert reg.get_sample_value("tandem_cloud_request_energy_joules_sum", h) == pytest.approx(3.0)


def test_no_meter_records_nothing():
    metrics = CloudMetrics(CollectorRegistry(), model_name="m")
    servicer = CloudServicer(manager=None, metrics=metrics)  # type: ignore[arg-type]
    servicer._energy("Upload", servicer._joules(), 1)
    assert (
        metrics.registry.get_sample_value(
            "tandem_cloud_energy_joules_total", {"model": "m", "source": "modelled"}
        )
        is None
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_startup_error(capsys):
    from services.cloud_ctx.main import parse_settings
    from tandem.models.registry import ModelRegistry

    with pytest.raises(SystemExit):
        parse_settings(ModelRegistry(), ["--device", "cuda", "--no-redis"])
    assert "asks for a GPU" in capsys.readouterr().err
    assert parse_settings(ModelRegistry(), ["--device", "auto", "--no-redis"]).device == "cpu"
