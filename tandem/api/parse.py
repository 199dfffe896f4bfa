"""Request bodies into protocol models, prompts into token ids: client mistakes become 400s."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from tandem.api.errors import ApiError, validation_error
from tandem.runtime.engine_api import PromptTooLong

ReqT = TypeVar("ReqT", bound=BaseModel)


async def parse_body(request: Request, model: type[ReqT]) -> ReqT:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None


def encode_prompt(fn: Callable[[], Sequence[int]], param: str) -> tuple[int, ...]:
    """Tokenize; a ValueError from the tokenizer or chat template is the client's fault."""
    try:
        return tuple(fn())
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise ApiError(400, f"Could not encode the {param}: {exc}", param=param) from exc
