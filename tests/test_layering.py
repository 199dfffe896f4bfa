"""The layering rule: a service package imports only `tandem/`, the generated protos and its own
package; what two services share lives in `tandem/`. `tandem/` itself never imports a service
(`tandem.cli` and `tandem.cluster` name service modules as strings, to run them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tandem.launch import ROOT

SERVICES = ROOT / "services"
PACKAGES = sorted(p.name for p in SERVICES.iterdir() if (p / "__init__.py").exists())


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an `import` or `from ... import` in `path` names (at any depth,
    function-local imports included), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            module = node.module or ""
            if module == "services":  # `from services import edge_node`
                out += [(node.lineno, f"services.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, module))
    return out


def foreign_service_imports(path: Path, own: str | None) -> list[str]:
    """`file:line module` for every import of a service package other than `own`."""
    bad = []
    for line, module in imported_modules(path):
        parts = module.split(".")
        if parts[0] != "services":
            continue
        if own is None or len(parts) < 2 or parts[1] != own:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            bad.append(f"{where}:{line} {module}")
    return bad


def test_there_are_service_packages() -> None:
    assert {"edge_node", "cloud_ctx", "attention_pool", "router"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_service_imports_no_other_service(package: str) -> None:
    files = sorted((SERVICES / package).rglob("*.py"))
    assert files
    bad = [b for f in files for b in foreign_service_imports(f, package)]
    assert not bad, "move what services share into tandem/:\n" + "\n".join(bad)


def test_tandem_imports_no_service() -> None:
    files = sorted((ROOT / "tandem").rglob("*.py"))
    bad = [b for f in files for b in foreign_service_imports(f, None)]
    assert not bad, "tandem/ is the shared library under the services:\n" + "\n".join(bad)


def test_the_check_sees_a_cross_service_import(tmp_path: Path) -> None:
    """The rule can fail: plain, `from services import x`, and function-local imports."""
    probe = tmp_path / "probe.py"
    source = (
        "import services.router.budget\n"
        "from services import edge_node\n"
        "def f():\n"
        "    from services.cloud_ctx.session_store import SessionStore\n"
    )
    probe.write_text(source)
    bad = foreign_service_imports(probe, "router")
    assert [b.split(" ")[1] for b in bad] == [
        "services.edge_node",
        "services.cloud_ctx.session_store",
    ]
