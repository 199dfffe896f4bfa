"""`tandem`: the console script, its help, each subcommand forwarding to the service's own
argparse, and clear usage errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tandem import cli
from tandem.launch import ROOT

# A flag only that service's parser has, to show the help really is the service's.
OWN_FLAG = {
    "edge": "--grpc-port",
    "cloud": "--metrics-port",
    "pool": "--n-kv-heads",
    "router": "--config",
}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_console_script_is_installed_with_the_package() -> None:
    [script] = entry_points(group="console_scripts", name="tandem")
    assert script.value == "tandem.cli:console"
    installed = Path(sys.executable).parent / "tandem"
    assert installed.exists(), "run `make setup` (pip install -e .) to install `tandem`"
    # from another directory: the command does not depend on the working directory
    done = subprocess.run(
        [str(installed), "serve", "edge", "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tandem serve edge")
    assert "--grpc-port" in done.stdout


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for service in OWN_FLAG:
        assert f"serve {service}" in out
    assert "cluster" in out
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0
    assert all(service in out for service in OWN_FLAG)


@pytest.mark.parametrize("service", sorted(OWN_FLAG))
def test_serve_help_is_the_services_own(service: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "serve", service, "--help")
    assert code == 0
    assert out.startswith(f"usage: tandem serve {service}")
    assert OWN_FLAG[service] in out
    assert sys.argv[0] != f"tandem serve {service}"  # restored after the call


def test_cluster_help_and_a_bad_cluster_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "cluster", "--help")
    assert code == 0
    assert out.startswith("usage: tandem cluster")
    assert "--config" in out
    bad = tmp_path / "cluster.yaml"
    bad.write_text("edges: [1, 2\n")
    code, _, err = run_cli(capsys, "cluster", "--config", str(bad))
    assert code == 2
    assert "cluster:" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "nope"], "unknown service 'nope'"),
        (["serve"], "serve needs a service"),
        (["launch"], "unknown command 'launch'"),
        ([], "a command is required"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("usage: tandem serve")
    assert f"tandem: error: {message}" in err


def test_a_bad_service_flag_is_the_services_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(capsys, "serve", "router", "--colour", "blue")
    assert code == 2
    assert "usage: tandem serve router" in err
    assert "--colour" in err


def test_make_targets_call_the_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target, command in [
        ("run", "cluster"),
        ("run-edge", "serve edge"),
        ("run-cloud", "serve cloud"),
        ("run-pool", "serve pool"),
        ("run-router", "serve router"),
    ]:
        recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        assert f"$(TANDEM) {command}" in recipe, (target, recipe)
