"""tandem.cloud.v1 message helpers shared by the cloud context manager and its clients:
hidden states, sampling parameters and speculative drafts/verdicts <-> messages, and the
trailing-metadata key that tells an edge where a session ends."""

from __future__ import annotations

import torch

from tandem.runtime.sampling import SamplingParams
from tandem.runtime.speculative import Draft, Rollback, Speculation, Verdict
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


def sampling_to_proto(params: SamplingParams) -> cloud_pb2.Sampling:
    msg = cloud_pb2.Sampling(temperature=params.temperature, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: cloud_pb2.Sampling) -> SamplingParams:
    """Raises ValueError for out-of-range parameters."""
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
    )


def speculation_to_proto(spec: Speculation) -> cloud_pb2.Speculation:
    return cloud_pb2.Speculation(
        epoch=spec.epoch,
        sampling=sampling_to_proto(spec.params),
        drafts=[
            cloud_pb2.Draft(position=d.position, token_id=d.token, q_ids=d.q_ids, q_probs=d.q_probs)
            for d in spec.drafts
        ],
    )


def speculation_from_proto(msg: cloud_pb2.Speculation) -> Speculation:
    """Raises ValueError for a malformed draft."""
    drafts = []
    for d in msg.drafts:
        if len(d.q_ids) != len(d.q_probs):
            raise ValueError(
                f"draft after {d.position}: {len(d.q_ids)} ids, {len(d.q_probs)} probs"
            )
        if d.q_ids and d.token_id not in d.q_ids:
            raise ValueError(f"draft after {d.position}: token outside its draft distribution")
        drafts.append(Draft(d.position, d.token_id, tuple(d.q_ids), tuple(d.q_probs)))
    return Speculation(msg.epoch, sampling_from_proto(msg.sampling), tuple(drafts))


def verdict_to_proto(v: Verdict) -> cloud_pb2.Verdict:
    msg = cloud_pb2.Verdict(epoch=v.epoch, checked=v.checked)
    if v.rollback is not None:
        msg.rollback.CopyFrom(
            cloud_pb2.Rollback(
                position=v.rollback.position, token_id=v.rollback.token, prob=v.rollback.prob
            )
        )
    return msg


def verdict_from_proto(msg: cloud_pb2.Verdict) -> Verdict:
    rb = None
    if msg.HasField("rollback"):
        rb = Rollback(msg.rollback.position, msg.rollback.token_id, msg.rollback.prob)
    return Verdict(msg.epoch, msg.checked, rb)
