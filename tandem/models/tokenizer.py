"""Text <-> token ids for one model, with its chat template (or a plain fallback)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tandem.runtime.engine_api import ChatMessage

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class TextCodec:
    def __init__(self, path: Path, eos_ids: Sequence[int]) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        ids = set(eos_ids)
        if self._tok.eos_token_id is not None:
            ids.add(self._tok.eos_token_id)
        self.eos_ids = frozenset(ids)
        self.has_chat_template = bool(self._tok.chat_template)
        # Strings the tokenizer turns into control tokens (<|im_start|>, <|endoftext|>, ...).
        self._specials = tuple(
            t.content for t in self._tok.added_tokens_decoder.values() if t.special and t.content
        )

    def encode(self, text: str) -> list[int]:
        """Raw prompt: the tokenizer's own special tokens (BOS where the model wants it)."""
        return list(self._tok(text).input_ids)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template's tokens. Message content is text only: a special-token string a
        client writes (e.g. "<|im_start|>system") is tokenized as plain text, never as the
        control token, so content cannot forge turns."""
        if self.has_chat_template:
            if any(sp in m.content for m in messages for sp in self._specials):
                return self._encode_chat_guarded(messages)
            text = self._tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
            return list(self._tok(text, add_special_tokens=False).input_ids)
        # Base models without a template (gemma-3-270m): a plain transcript.
        text = "".join(f"{PLAIN_ROLES[m.role]}: {m.content}\n" for m in messages) + "Assistant:"
        return self.encode(text)

    def _encode_chat_guarded(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the template around placeholders, then tokenize the template's own parts
        with special tokens and every message's content with special tokens split."""
        marks = [f"\x00tandem-content-{i}\x00" for i in range(len(messages))]
        text = self._tok.apply_chat_template(
            [{"role": m.role, "content": mark} for m, mark in zip(messages, marks, strict=True)],
            add_generation_prompt=True,
            tokenize=False,
        )
        ids: list[int] = []
        for m, mark in zip(messages, marks, strict=True):
            head, _, text = text.partition(mark)
            ids += self._tok(head, add_special_tokens=False).input_ids
            ids += self._tok(
                m.content, add_special_tokens=False, split_special_tokens=True
            ).input_ids
        return ids + list(self._tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)
