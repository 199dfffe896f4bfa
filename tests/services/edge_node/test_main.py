"""Edge node settings: collaborative mode flags."""

from __future__ import annotations

import pytest

from services.edge_node.main import parse_settings
from tandem.models.registry import ModelRegistry


def test_standalone_by_default():
    s = parse_settings(ModelRegistry(), ["--model", "smollm2"])
    assert s.split is None and s.cloud is None


def test_split_auto_is_the_middle_exit_and_cloud_is_parsed():
    s = parse_settings(
        ModelRegistry(),
        ["--model", "qwen15", "--split", "auto", "--cloud", "127.0.0.1:50061", "--tau", "0.8"],
    )
    assert s.split == 14 and s.cloud == "127.0.0.1:50061" and s.tau == 0.8
    assert s.cloud_encoding == "fp16"


@pytest.mark.parametrize(
    "argv", [["--split", "13"], ["--cloud", "127.0.0.1:1"], ["--cloud-encoding", "bf8"]]
)
def test_bad_collab_flags_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(ModelRegistry(), ["--model", "smollm2", *argv])
    assert "error" in capsys.readouterr().err


COLLAB = ["--model", "qwen15", "--split", "auto", "--cloud", "127.0.0.1:50061", "--tau", "0.8"]


def test_final_mode_never_lowers_tau_below_its_promise(capsys):
    s = parse_settings(ModelRegistry(), COLLAB)
    assert s.collab == "final" and s.tau_min == s.tau == 0.8  # latency-aware lowering off
    with pytest.raises(SystemExit) as exc:
        parse_settings(ModelRegistry(), [*COLLAB, "--tau-min", "0.5"])
    assert exc.value.code == 2 and "--collab speculative" in capsys.readouterr().err


def test_speculative_mode_may_lower_tau():
    s = parse_settings(ModelRegistry(), [*COLLAB, "--collab", "speculative"])
    assert s.collab == "speculative" and s.tau_min == 0.5
    s = parse_settings(ModelRegistry(), [*COLLAB, "--collab", "speculative", "--tau-min", "0.2"])
    assert s.tau_min == 0.2
