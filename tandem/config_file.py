"""One YAML file for a whole cluster; each service reads its own part of it.

A service started with `--config configs/cluster.yaml --name <name>` (or TANDEM_CONFIG /
TANDEM_SERVICE) looks up its section: `edges: {<name>: {...}}` for edge nodes, and the
top-level `cloud_ctx:`, `attention_pool:`, `router:` sections for the others. Every setting
then comes from, in order: the command-line flag, the environment variable, the file, the
built-in default. `Settings.get(env_name, key, default)` gives exactly that order for one
argparse default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV, SERVICE_ENV = "TANDEM_CONFIG", "TANDEM_SERVICE"


class ConfigFileError(ValueError):
    """The cluster file is missing, not YAML, or has no section for this service."""


def load_yaml(path: Path) -> Mapping[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigFileError(f"{path} must hold a mapping")
    return raw


def service_section(raw: Mapping[str, Any], kind: str, name: str | None) -> Mapping[str, Any]:
    """`kind` "edge" reads `edges.<name>`; any other kind its top-level section."""
    if kind == "edge":
        edges = raw.get("edges") or {}
        if not name or name not in edges:
            known = ", ".join(sorted(edges)) or "none"
            raise ConfigFileError(f"no edge named {name!r} in the config (edges: {known})")
        section = edges[name]
    else:
        section = raw.get(kind)
        if section is None:
            raise ConfigFileError(f"the config has no {kind!r} section")
    if not isinstance(section, Mapping):
        raise ConfigFileError(f"the {kind} section {name or ''} must be a mapping")
    return section


@dataclass(frozen=True)
class Settings:
    """Defaults for one service: environment first, then its config section."""

    section: Mapping[str, Any]
    env: Mapping[str, str]

    @classmethod
    def from_argv(
        cls,
        argv: Sequence[str] | None,
        kind: str,
        env: Mapping[str, str] = os.environ,
    ) -> Settings:
        """Find --config / --name in argv (or TANDEM_CONFIG / TANDEM_SERVICE) and load the
        section; no config: an empty section (env and built-in defaults only)."""
        args = list(sys.argv[1:] if argv is None else argv)
        path = _flag(args, "--config") or env.get(CONFIG_ENV)
        name = _flag(args, "--name") or env.get(SERVICE_ENV)
        if not path:
            return cls({}, env)
        return cls(service_section(load_yaml(Path(path)), kind, name), env)

    def get(self, env_name: str | None, key: str, default: Any = None) -> Any:
        if env_name and self.env.get(env_name) not in (None, ""):
            return self.env[env_name]
        value = self.section.get(key)
        return default if value is None else value

    def unknown(self, known: Sequence[str]) -> list[str]:
        return sorted(k for k in self.section if k not in set(known))


def _flag(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
