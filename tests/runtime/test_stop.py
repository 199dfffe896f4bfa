"""StopMatcher: incremental text with stop strings and incomplete UTF-8 held back.

The matcher is fed the full decoded text at every step (as the engine does) and must
return only the new safe part. The randomized test at the end checks it against an
independent reference: decode byte prefixes of a UTF-8 string with errors="replace" (the
way a detokenizer shows an incomplete character) and compute the expected output from
the first step whose text contains a stop string.
"""

from __future__ import annotations

import random

import pytest

from tandem.runtime.stop import StopMatcher


def _run(stops: tuple[str, ...], texts: list[str]) -> tuple[list[str], bool, str]:
    m = StopMatcher(stops)
    pieces: list[str] = []
    for t in texts:
        out, hit = m.feed(t)
        pieces.append(out)
        if hit:
            return pieces, True, m.flush()
    return pieces, False, m.flush()


def _growing(text: str) -> list[str]:
    return [text[:i] for i in range(1, len(text) + 1)]


def test_stop_spanning_several_steps_is_never_emitted():
    m = StopMatcher(("</end>",))
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("Hello </e") == ("", False)
    assert m.feed("Hello </en") == ("", False)
    assert m.feed("Hello </end>") == ("", True)
    assert m.flush() == ""


def test_text_before_stop_emitted_exactly_and_nothing_after():
    pieces, hit, rest = _run(("STOP",), ["abc", "abcdeSTOPxyz"])
    assert hit
    assert pieces == ["abc", "de"]
    assert rest == ""


def test_false_alarm_releases_held_text():
    m = StopMatcher(("</end>",))
    assert m.feed("a</") == ("a", False)
    assert m.feed("a</e") == ("", False)
    assert m.feed("a</ex") == ("</ex", False)
    assert m.feed("a</ex</end") == ("", False)
    assert m.feed("a</ex</end>") == ("", True)


def test_held_prefix_is_the_longest_one():
    # "abab" prefix "aba" must be held whole, "ab" would not be enough
    m = StopMatcher(("abab",))
    assert m.feed("xaba") == ("x", False)
    assert m.feed("xabac") == ("abac", False)
    m = StopMatcher(("abab",))
    assert m.feed("xaba") == ("x", False)
    assert m.feed("xabab") == ("", True)


def test_stop_at_the_start():
    assert _run(("Q:",), _growing("Q: and more")) == (["", ""], True, "")


@pytest.mark.parametrize("stops", [("world", "lo w"), ("lo w", "world")])
def test_earliest_stop_wins_in_one_chunk(stops):
    m = StopMatcher(stops)
    assert m.feed("hello world") == ("hel", True)


def test_earliest_of_multiple_stops_stepwise():
    stops = ("\n\n", "User:", "###")
    pieces, hit, _ = _run(stops, _growing("Answer: 42 ##x\nUser: hi\n\n"))
    assert hit
    assert "".join(pieces) == "Answer: 42 ##x\n"


def test_overlapping_prefixes_of_different_stops():
    m = StopMatcher(("abc", "bcd"))
    assert m.feed("xab") == ("x", False)
    assert m.feed("xabx") == ("abx", False)
    m = StopMatcher(("abc", "bcd"))
    assert m.feed("xab") == ("x", False)
    assert m.feed("xabc") == ("", True)


def test_trailing_replacement_char_held_until_complete():
    m = StopMatcher(())
    assert m.feed("caf") == ("caf", False)
    assert m.feed("caf\ufffd") == ("", False)
    assert m.feed("café") == ("é", False)
    assert m.feed("café \ufffd\ufffd") == (" ", False)
    assert m.feed("café 日") == ("日", False)
    assert m.flush() == ""


def test_replacement_char_and_stop_prefix_together():
    m = StopMatcher(("a\u00e9!",))
    assert m.feed("xa\ufffd") == ("x", False)
    assert m.feed("xa\u00e9") == ("", False)
    assert m.feed("xa\u00e9!") == ("", True)


def test_flush_returns_held_text():
    m = StopMatcher(("###",))
    assert m.feed("x#") == ("x", False)
    assert m.feed("x##") == ("", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_flush_returns_trailing_replacement_char():
    m = StopMatcher(())
    assert m.feed("ok\ufffd") == ("ok", False)
    assert m.flush() == "\ufffd"


def test_refeeding_same_text_emits_nothing():
    m = StopMatcher(("zz",))
    assert m.feed("abc") == ("abc", False)
    assert m.feed("abc") == ("", False)
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored():
    m = StopMatcher(("", "END"))
    assert m.stops == ("END",)
    assert m.feed("abc") == ("abc", False)
    assert StopMatcher(("",)).feed("abc") == ("abc", False)


def test_no_stops_emits_everything_at_once():
    pieces, hit, rest = _run((), _growing("plain text"))
    assert not hit
    assert pieces == list("plain text")
    assert rest == ""


# --- randomized check against a reference -----------------------------------------------

ALPHABET = ["a", "b", "c", " ", "\n", "é", "日", "😀", "#"]
STOP_POOL = ["ab", "b c", "\n\n", "##", "é日", "a", "😀#", "ca b", "abab", "aab", "日"]


def _expected(stops: tuple[str, ...], texts: list[str], final: str) -> tuple[str, bool]:
    for t in texts:
        found = [t.find(s) for s in stops if s in t]
        if found:
            return t[: min(found)], True
    return final, False


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_match_reference(seed):
    rng = random.Random(seed)
    for _ in range(150):
        final = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))
        stops = tuple(rng.sample(STOP_POOL, rng.randint(0, 3)))
        data = final.encode()
        # byte cut points, as token boundaries may split a UTF-8 sequence
        cuts = sorted(set(rng.sample(range(1, len(data) + 1), min(len(data), rng.randint(1, 8)))))
        if data and cuts[-1] != len(data):
            cuts.append(len(data))
        texts = [data[:c].decode("utf-8", errors="replace") for c in cuts]
        want, want_hit = _expected(stops, texts, final)

        m = StopMatcher(stops)
        emitted = ""
        hit = False
        for t in texts:
            out, hit = m.feed(t)
            emitted += out
            # nothing emitted may later turn out to be part of a stop or an incomplete char
            assert want.startswith(emitted), (stops, texts, emitted, want)
            if hit:
                break
        emitted += m.flush()
        ctx = (stops, texts)
        assert hit == want_hit, ctx
        assert emitted == want, ctx
        assert "\ufffd" not in emitted, ctx
        for s in stops:
            assert s not in emitted, ctx
