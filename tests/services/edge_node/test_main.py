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
