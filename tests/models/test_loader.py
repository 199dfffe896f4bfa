"""LoadedModel.decoder: which exit heads a decoder gets."""

from __future__ import annotations

import dataclasses

import pytest

from tandem.models.loader import LoadedModel
from tandem.models.registry import DEFAULT_MODELS
from tests.runtime.test_decoder import _heads
from tests.tiny import ByteCodec, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _loaded(model, served_exits):
    spec = dataclasses.replace(DEFAULT_MODELS[0], exit_layers=(1, 2), served_exits=served_exits)
    return LoadedModel(spec, model, _heads(model, (1, 2)), ByteCodec(), "bf16")


def test_a_standalone_decoder_gets_only_the_served_exits(model):
    assert _loaded(model, (2,)).decoder().exit_layers == (2,)
    assert _loaded(model, None).decoder().exit_layers == (1, 2)


def test_split_decoders_keep_every_head_before_the_split(model):
    lm = _loaded(model, (2,))
    assert lm.decoder(depth=2).exit_layers == (1,)
    assert lm.decoder(depth=2).split_head.cfg.layer == 2
    assert lm.decoder(depth=2, split_only=True).exit_layers == ()
