"""The k > 1 aggregation rule: gate-weighted plurality vote over whole answers."""

from __future__ import annotations

import pytest

from services.router.aggregate import Answer, weighted_vote


def test_agreeing_answers_pool_their_weight() -> None:
    answers = [Answer("a", 0.5, "Paris."), Answer("b", 0.3, "paris. "), Answer("c", 0.2, "Rome")]
    assert weighted_vote(answers).expert_id == "a"
    answers = [Answer("a", 0.4, "Rome"), Answer("b", 0.35, "Paris"), Answer("c", 0.25, " paris")]
    assert weighted_vote(answers).expert_id == "b"  # Paris 0.6 beats Rome 0.4; b weighs most


def test_all_different_returns_the_top_weight_and_ties_go_to_the_ranking() -> None:
    answers = [Answer("a", 0.2, "x"), Answer("b", 0.5, "y"), Answer("c", 0.3, "z")]
    assert weighted_vote(answers).expert_id == "b"
    assert weighted_vote([Answer("a", 0.5, "x"), Answer("b", 0.5, "y")]).expert_id == "a"
    with pytest.raises(ValueError):
        weighted_vote([])
