from collections import Counter

import pytest

from tandem.data import corpus
from tandem.data.corpus import SOURCES, CorpusMissing, TextSample, load_corpus

SPLITS = ("train", "heldout", "test")


def test_splits_are_disjoint() -> None:
    texts = {s: {x.text for x in load_corpus(s, 300)} for s in SPLITS}
    assert not texts["train"] & texts["heldout"]
    assert not texts["train"] & texts["test"]
    assert not texts["heldout"] & texts["test"]


def test_split_membership_does_not_depend_on_seed_or_n() -> None:
    test_texts = {x.text for x in load_corpus("test", 500, seed=0)}
    other_seed = load_corpus("test", 50, seed=7)
    train_texts = {x.text for x in load_corpus("train", 500, seed=7)}
    assert all(corpus._split_of(x.source, x.text) == "test" for x in other_seed)
    assert not test_texts & train_texts


def test_deterministic_and_prefix_stable() -> None:
    a = load_corpus("heldout", 20, seed=3)
    assert a == load_corpus("heldout", 20, seed=3)
    assert load_corpus("heldout", 5, seed=3) == a[:15]
    assert load_corpus("heldout", 20, seed=4) != a


def test_sources_mixed_evenly() -> None:
    samples = load_corpus("train", 30)
    assert all(isinstance(x, TextSample) for x in samples)
    assert Counter(x.source for x in samples) == {s: 30 for s in SOURCES}
    assert [x.source for x in samples[:3]] == list(SOURCES)
    assert all(corpus.MIN_CHARS <= len(x.text) <= corpus.MAX_CHARS for x in samples)
    assert len({x.text for x in samples}) == len(samples)


def test_wordnet_text_shape() -> None:
    wn = [x.text for x in load_corpus("test", 20) if x.source == "wordnet"]
    assert all(": " in t and "_" not in t.split(": ")[0] for t in wn)


def test_too_many_requested() -> None:
    with pytest.raises(ValueError, match="only"):
        load_corpus("test", 10**7)


def test_missing_source_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path / "nope")
    with pytest.raises(CorpusMissing, match="make setup"):
        load_corpus("train", 1)
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path)
    with pytest.raises(CorpusMissing, match="wordnet-base"):
        corpus._texts("wordnet")
