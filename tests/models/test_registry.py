"""The model registry: lookups, and the consistency of the four default specs."""

from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import replace

import pytest

from tandem.models import fetch
from tandem.models.registry import (
    DEFAULT_MODELS,
    LocalFile,
    ModelRegistry,
    WheelParts,
)


def test_default_ids():
    assert ModelRegistry().ids() == ("smollm2", "gemma3", "qwen05", "qwen15")


@pytest.mark.parametrize("model_id", ["smollm2", "gemma3", "qwen05", "qwen15"])
def test_get_returns_the_spec(model_id):
    spec = ModelRegistry().get(model_id)
    assert spec.id == model_id
    assert spec.cache_name == model_id


@pytest.mark.parametrize("bad", ["", "SmolLM2", "qwen", "llama-7b"])
def test_unknown_id_lists_known_ids(bad):
    with pytest.raises(KeyError) as e:
        ModelRegistry().get(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for known in ("smollm2", "gemma3", "qwen05", "qwen15"):
        assert known in msg


def test_custom_registry_with_local_file(tmp_path):
    mine = replace(DEFAULT_MODELS[0], id="mine", source=LocalFile(str(tmp_path / "m.gguf")))
    reg = ModelRegistry(specs=(*DEFAULT_MODELS, mine))
    assert reg.get("mine") is mine
    assert reg.ids()[-1] == "mine"
    with pytest.raises(KeyError, match="mine"):
        ModelRegistry(specs=(mine,)).get("smollm2")


def test_ids_are_unique():
    ids = [s.id for s in DEFAULT_MODELS]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("spec", DEFAULT_MODELS, ids=lambda s: s.id)
def test_default_spec_is_consistent(spec):
    assert spec.architecture in ("llama", "qwen2", "gemma3")
    assert spec.chat_template in ("builtin", "plain")
    assert spec.file_name.endswith(".gguf")
    src = spec.source
    assert isinstance(src, WheelParts)
    assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
    # exactly one pin per distribution, same names, pinned to a version
    assert len(src.requirement_pins) == len(src.distributions)
    for dist, pin in zip(src.distributions, src.requirement_pins, strict=True):
        name, _, version = pin.partition("==")
        assert name == dist and re.fullmatch(r"\d+(\.\d+)*", version), pin
    assert len(set(src.distributions)) == len(src.distributions)
    # exits are strictly increasing, non-empty and start above layer 0
    assert spec.exit_layers and list(spec.exit_layers) == sorted(set(spec.exit_layers))
    assert spec.exit_layers[0] > 0
    assert spec.served_exits is None or set(spec.served_exits) <= set(spec.exit_layers)


def test_shas_are_distinct():
    shas = [s.source.sha256 for s in DEFAULT_MODELS]
    assert len(set(shas)) == len(shas)


def _installed(spec) -> bool:
    try:
        for d in spec.source.distributions:
            md.distribution(d)
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("spec", DEFAULT_MODELS, ids=lambda s: s.id)
def test_installed_parts_are_in_numeric_order(spec):
    """The members of each wheel set come back in part order (part2 before part10)."""
    if not _installed(spec):
        pytest.skip(f"{spec.id} packages not installed (run `make setup`)")
    members = fetch._wheel_members(spec.source)
    assert len(members) >= len(spec.source.distributions)
    assert all(p.is_file() for p in members)
    if len(members) == 1:
        return
    numbers = [int(re.findall(r"\d+", p.name)[-1]) for p in members]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gaps
