"""`python -m bench.run_from <dir> <module> [args...]`: run `<module>` as `__main__` with
`<dir>` first on the import path, so a benchmark can start a service from another checkout
of the code (e.g. the router at an older commit, extracted with `git archive`) next to the
current one. Packages missing from `<dir>` (the generated `tandem_proto`) come from here.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.run_from <dir> <module> [args...]")
    where, module, *args = sys.argv[1:]
    sys.path.insert(0, where)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
