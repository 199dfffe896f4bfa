"""Pure helpers of bench.attn (no model, no processes)."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.attn import (
    Cell,
    choose_steps,
    parse_ints,
    parse_pair,
    per_token_layer,
    predict_step_s,
    ratio,
    side_by_side,
)


def test_choose_steps_fits_budget_within_bounds():
    assert choose_steps(0.1, 5.0, 2, 8) == 8
    assert choose_steps(1.0, 5.0, 2, 8) == 5
    assert choose_steps(10.0, 5.0, 2, 8) == 2
    assert choose_steps(0.0, 5.0, 2, 8) == 8


def test_predict_step_is_linear_in_batch():
    assert predict_step_s(None, 8) is None
    assert predict_step_s((4, 1.0), 16) == pytest.approx(4.0)


def test_per_token_layer_and_ratio():
    assert per_token_layer(7168 * 3 * 14, 3, 14) == 7168
    assert math.isnan(per_token_layer(10, 0, 14))
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


def test_parsers():
    assert parse_ints("1, 4,8") == (1, 4, 8)
    assert parse_pair("16x512") == (16, 512)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ints("0,2")


def test_cell_throughput_and_side_by_side_table():
    local = Cell("local", 4, 128, steps=2, step_s=[0.2, 0.2], attn_s=0.05)
    off = Cell("offload", 4, 128, steps=2, step_s=[0.4, 0.4], attn_s=0.3)
    mb2 = Cell("offload-mb2", 4, 128, skipped="predicted 9 s/step > 5 s")
    assert local.tok_s == pytest.approx(20.0)
    assert local.dense_s == pytest.approx(0.15)
    assert not mb2.ok and mb2.tok_s is None
    data = {
        "meta": {"args": {"contexts": [128], "batches": [4]}},
        "cells": [c.as_dict() for c in (local, off, mb2)],
    }
    table = side_by_side(data)
    row = table.splitlines()[-1]
    assert "| 128 | 4 | 20.0 | 10.0 | skipped |" in row
    assert "| 0.50 |" in row
