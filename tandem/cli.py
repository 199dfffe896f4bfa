"""`tandem`: one command for every Tandem service (installed by `make setup` from pyproject's
[project.scripts]).

    tandem serve edge   [edge node options]       an edge node (OpenAI HTTP API + gRPC)
    tandem serve cloud  [cloud_ctx options]       the cloud context manager (CE-CoLLM)
    tandem serve pool   [attention pool options]  a Lamina attention pool (N workers)
    tandem serve router [router options]          the public front door (MoE² routing)
    tandem cluster      [--config FILE ...]       the whole cluster from one YAML

Each subcommand hands its arguments, untouched, to that service's own argparse `main` (so
`tandem serve edge --help` is the edge node's help, and the flags and environment variables
are the ones the service documents). Services are named here as module strings and imported
only when chosen: `tandem --help` stays fast, and `tandem/` imports no service package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

PROG = "tandem"
USAGE_ERROR = 2  # argparse's exit status for a bad command line


@dataclass(frozen=True)
class Entry:
    """A command's target: `module.main(argv)`."""

    module: str
    summary: str


SERVICES: dict[str, Entry] = {
    "edge": Entry("services.edge_node.main", "an edge node: OpenAI HTTP API and gRPC"),
    "cloud": Entry("services.cloud_ctx.main", "the cloud context manager (CE-CoLLM upper half)"),
    "pool": Entry("services.attention_pool.main", "a Lamina attention pool (N workers)"),
    "router": Entry("services.router.main", "the router: the public OpenAI API, MoE² routing"),
}
CLUSTER = Entry("tandem.cluster", "the whole cluster on this machine, from one YAML file")


def _usage() -> str:
    names = "|".join(SERVICES)
    return (
        f"usage: {PROG} serve {{{names}}} [service options ...]\n"
        f"       {PROG} cluster [--config FILE] [cluster options ...]\n"
        f"       {PROG} --help"
    )


def _help() -> str:
    width = max(len(n) for n in SERVICES)
    lines = [_usage(), "", "Tandem: edge/cloud LLM serving.", "", "commands:"]
    for name, entry in SERVICES.items():
        lines.append(f"  serve {name:<{width}}   {entry.summary}")
    lines.append(f"  {'cluster':<{width + 6}}   {CLUSTER.summary}")
    lines += [
        "",
        f"`{PROG} serve <service> --help` and `{PROG} cluster --help` list each one's options.",
    ]
    return "\n".join(lines)


def _serve_help() -> str:
    width = max(len(n) for n in SERVICES)
    lines = [
        f"usage: {PROG} serve {{{'|'.join(SERVICES)}}} [service options ...]",
        "",
        "Run one Tandem service in the foreground.",
        "",
        "services:",
    ]
    lines += [f"  {name:<{width}}   {entry.summary}" for name, entry in SERVICES.items()]
    lines += ["", f"`{PROG} serve <service> --help` lists that service's options."]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(_usage(), file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


@contextmanager
def _prog(name: str) -> Iterator[None]:
    """argparse takes its `prog` from sys.argv[0]: make the service's usage line read
    `tandem serve edge ...` rather than the script's path."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        sys.argv[0] = saved


def _run(entry: Entry, prog: str, argv: Sequence[str]) -> int:
    main: Callable[[list[str]], object] = importlib.import_module(entry.module).main
    with _prog(prog):
        try:
            result = main(list(argv))
        except SystemExit as exc:  # argparse (--help, bad flags) and services that exit
            return _exit_code(exc.code)
    return _exit_code(result)


def _exit_code(result: object) -> int:
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)  # sys.exit("message") convention
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _fail("a command is required (serve or cluster)")
    command, rest = args[0], args[1:]
    if command in ("-h", "--help"):
        print(_help())
        return 0
    if command == "serve":
        if not rest:
            return _fail(f"serve needs a service: one of {', '.join(SERVICES)}")
        if rest[0] in ("-h", "--help"):
            print(_serve_help())
            return 0
        service = rest[0]
        entry = SERVICES.get(service)
        if entry is None:
            return _fail(
                f"unknown service {service!r} (choose from {', '.join(map(repr, SERVICES))})"
            )
        return _run(entry, f"{PROG} serve {service}", rest[1:])
    if command == "cluster":
        return _run(CLUSTER, f"{PROG} cluster", rest)
    return _fail(f"unknown command {command!r} (choose from 'serve', 'cluster')")


def console() -> None:
    """The `tandem` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
