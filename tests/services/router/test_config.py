"""The router's YAML configuration: the shipped file parses, env overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.router.config import (
    DEFAULT_CONFIG,
    RouterConfigError,
    load_router_config,
    parse_router_config,
)
from services.router.reference import REFERENCE_TIMINGS

EXPERT = {"id": "smollm2", "kind": "edge", "device": "cpu", "replicas": ["127.0.0.1:50051"]}


def test_shipped_config_parses_and_env_overrides() -> None:
    cfg = load_router_config(DEFAULT_CONFIG, {})
    assert [e.expert_id for e in cfg.experts] == ["smollm2", "gemma3", "qwen05", "qwen15"]
    assert cfg.gate is not None and cfg.gate.path.exists() and cfg.gate.subset_losses.exists()
    assert cfg.api_key is None and cfg.budgets.top_k == 1
    assert cfg.experts[3].device == "rtx-4090"
    assert cfg.experts[0].decode_s_per_token == REFERENCE_TIMINGS["smollm2"].decode_s_per_token
    env = {"PORT": "9999", "HOST": "0.0.0.0", "TANDEM_API_KEY": "k", "TANDEM_GRPC_TOKEN": "t"}
    cfg = load_router_config(DEFAULT_CONFIG, env)
    assert (cfg.port, cfg.host, cfg.api_key) == (9999, "0.0.0.0", "k")
    assert all(e.token == "t" for e in cfg.experts)


def test_sections_and_defaults() -> None:
    cfg = parse_router_config(
        {
            "experts": [EXPERT],
            "budgets": {"latency_ms": 2000, "top_k": 2},
            "health": {"interval_s": 0.5},
            "gate": None,
        },
        {},
    )
    assert cfg.budgets.latency_ms == 2000 and cfg.budgets.top_k == 2
    assert cfg.health.interval_s == 0.5 and cfg.health.failure_threshold == 2
    assert cfg.gate is None and cfg.port == 8080


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "must hold a mapping"),
        ({"experts": [EXPERT], "colour": 1}, "unknown key.*colour"),
        ({"experts": [EXPERT], "budgets": {"latency": 5}}, "budgets: unknown key.*latency"),
        ({"experts": [EXPERT], "budgets": {"latency_ms": -1}}, "budgets: default latency_ms"),
        ({"experts": [EXPERT], "min_ready": 0}, "min_ready"),
        ({"experts": [EXPERT], "port": "http"}, "port"),
        ({"experts": [{**EXPERT, "id": "mystery"}]}, None),  # parses: timings checked at start
        ({"experts": [{**EXPERT, "decode_ms_per_token": -1}]}, "decode_ms_per_token"),
        ({"experts": []}, "'experts' is empty"),
    ],
)
def test_config_errors_name_the_key(raw: object, message: str | None) -> None:
    if message is None:
        cfg = parse_router_config(raw, {})
        assert cfg.experts[0].decode_s_per_token is None
        return
    with pytest.raises(RouterConfigError, match=message):
        parse_router_config(raw, {})


def test_unreadable_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(RouterConfigError, match="cannot read"):
        load_router_config(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n")
    with pytest.raises(RouterConfigError, match="not valid YAML"):
        load_router_config(bad, {})
