"""tandem.cloud.v1 message helpers shared by the cloud context manager and its clients:
hidden states <-> `HiddenStates` messages, and the trailing-metadata key that tells an
edge where a session ends."""

from __future__ import annotations

import torch

from tandem.transport.hidden import Encoding, HiddenPayload, encode_hidden
from tandem_proto.cloud.v1 import cloud_pb2

EXPECTED_POSITION_KEY = "tandem-expected-position"


def payload_to_proto(p: HiddenPayload) -> cloud_pb2.HiddenStates:
    return cloud_pb2.HiddenStates(
        encoding=p.encoding,
        n_tokens=p.n_tokens,
        hidden_size=p.hidden_size,
        data=p.data,
        scales=p.scales,
    )


def hidden_to_proto(h: torch.Tensor, encoding: Encoding = "fp16") -> cloud_pb2.HiddenStates:
    """States [n, d] as a message."""
    return payload_to_proto(encode_hidden(h, encoding))


def hidden_from_proto(msg: cloud_pb2.HiddenStates) -> HiddenPayload:
    """Raises ValueError for an unknown encoding or sizes that do not match."""
    if msg.encoding not in ("fp16", "int8"):
        raise ValueError(f"unknown hidden-state encoding {msg.encoding!r}")
    return HiddenPayload(msg.encoding, msg.n_tokens, msg.hidden_size, msg.data, msg.scales)
