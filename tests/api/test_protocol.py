"""Request validation and response serialisation of the OpenAI protocol models."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from tandem.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
)


def test_chat_request_normalises_roles_content_and_stop() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "sys"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "stop": "x",
            "max_tokens": 9,
            "unknown_field": [1, 2, 3],
        }
    )
    assert [m.engine_role for m in req.messages] == ["system", "user", "assistant"]
    assert [m.text for m in req.messages] == ["sys", "a\nb", ""]
    assert req.stop_list == ("x",)
    assert (req.requested_max_tokens, req.max_tokens_param) == (9, "max_tokens")
    assert not req.include_usage


def test_max_completion_tokens_takes_precedence() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
         "max_completion_tokens": 3}
    )  # fmt: skip
    assert (req.requested_max_tokens, req.max_tokens_param) == (3, "max_completion_tokens")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5, 2.01])
def test_temperature_must_be_finite_and_in_range(value: float) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "temperature": value})


def test_completion_defaults_follow_openai() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["p"]})
    assert req.max_tokens == 16 and req.n == 1 and req.stream is False
    assert req.prompt_text == "p"
    assert req.temperature is None and req.top_p is None  # server applies 1.0


def test_delta_leaves_out_unset_keys() -> None:
    assert DeltaMessage(role="assistant", content="").model_dump() == {
        "role": "assistant",
        "content": "",
    }
    assert DeltaMessage(content="hi").model_dump() == {"content": "hi"}
    assert DeltaMessage().model_dump_json() == "{}"
