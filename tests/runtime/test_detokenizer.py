"""IncrementalDetokenizer against full re-decoding: the tests' byte codec (every byte its own
token, so multi-byte characters always split) and the real SmolLM2 and Qwen2.5 tokenizers
(byte-level BPE: emoji and CJK split into byte tokens)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tandem.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer
from tests.tiny import ByteCodec

TEXTS = [
    "The three primary colors are red, blue and yellow.",
    "Emoji: 👍🏽 🇫🇷 👨‍👩‍👧‍👦 done. ✅",
    "中文测试：你好，世界！日本語のテキストも。한국어도.",
    "  leading spaces, tabs\tand\nnewlines\n\n  def f(x):\n      return x ** 2\n",
    "Mixed: café naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — “quotes” … 🙂🙃",
    "a",
    "",
]


def run(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[str]:
    """Deltas token by token, checking at every step that what was emitted is a prefix of
    the full decode so far and never ends in a held-back U+FFFD; the flush last."""
    detok = IncrementalDetokenizer(decode)
    deltas = []
    for k, token in enumerate(ids, 1):
        delta = detok.add(token)
        deltas.append(delta)
        emitted = "".join(deltas)
        assert detok.text == emitted
        full = decode(ids[:k])
        assert full.startswith(emitted), (k, emitted, full)
        if delta:
            assert not delta.endswith(REPLACEMENT)
    deltas.append(detok.flush())
    assert detok.flush() == ""
    return deltas


def check(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> None:
    assert "".join(run(decode, ids)) == decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_codec_matches_full_decode(text: str) -> None:
    codec = ByteCodec()
    ids = codec.encode(text)[1:]  # no BOS
    deltas = run(codec.decode, ids)
    assert "".join(deltas) == text
    # Every byte is a token: a character of n bytes arrives whole, on its last byte.
    assert [d for d in deltas if d] == list(text)


def test_incomplete_character_is_held_then_flushed_as_a_full_decode_shows_it() -> None:
    codec = ByteCodec()
    detok = IncrementalDetokenizer(codec.decode)
    emoji = "🙂".encode()
    assert detok.add(ord("a") + 3) == "a"
    for b in emoji[:3]:
        assert detok.add(b + 3) == ""  # never U+FFFD for an incomplete sequence
    assert detok.text == "a"
    assert detok.flush() == REPLACEMENT  # the sequence never completed
    ids = [ord("a") + 3, *(b + 3 for b in emoji[:3])]
    assert detok.text == codec.decode(ids)


def test_random_bytes_match_full_decode() -> None:
    """Invalid UTF-8 included: lone continuation bytes, truncated sequences."""
    codec = ByteCodec()
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(1, 24)
        high = [rng.randrange(0x80 + 3, 0x100 + 3) for _ in range(n)]  # non-ASCII bytes
        ids = [rng.choice((rng.randrange(3, 259), h)) for h in high]
        check(codec.decode, ids)


def test_window_stays_short() -> None:
    """Work per token does not grow with the output: each decode sees a few tokens."""
    codec = ByteCodec()
    seen: list[int] = []

    def decode(ids: Sequence[int]) -> str:
        seen.append(len(ids))
        return codec.decode(ids)

    ids = [b + 3 for b in ("x" * 500 + "🙂" * 50).encode()]
    detok = IncrementalDetokenizer(decode)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == codec.decode(ids)
    assert max(seen) <= 8  # a 4-byte character, and the emitted token before it


# -- real tokenizers -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["smollm2", "qwen05"])
def codec(request: pytest.FixtureRequest):
    from tandem.models.convert import ensure_converted
    from tandem.models.registry import ModelRegistry
    from tandem.models.tokenizer import TextCodec

    spec = ModelRegistry().get(request.param)
    return TextCodec(ensure_converted(spec, Path("model_cache")), ())


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_matches_full_decode(codec, text: str) -> None:
    ids = codec.encode(text)
    check(codec.decode, ids)
    assert codec.decode(ids).rstrip().endswith(text.rstrip())  # the ids do hold the text


@pytest.mark.slow
def test_real_tokenizer_splits_multibyte_characters(codec) -> None:
    """The texts above do put multi-byte characters across tokens (else the hold-back path
    would go untested), and no delta shows U+FFFD."""
    text = TEXTS[1] + TEXTS[2]
    ids = codec.encode(text)
    split = sum(1 for k in range(1, len(ids)) if codec.decode(ids[:k]).endswith(REPLACEMENT))
    assert split > 0
    deltas = run(codec.decode, ids)
    assert all(REPLACEMENT not in d for d in deltas)


@pytest.mark.slow
def test_real_tokenizer_random_ids_match_full_decode(codec) -> None:
    """Arbitrary token sequences (what a sampling model may produce), special tokens
    included (skipped by the decode)."""
    rng = random.Random(1)
    vocab = codec.vocab_size
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        check(codec.decode, ids)
