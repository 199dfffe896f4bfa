"""Calibration / evaluation text corpus from three real, offline sources.

- ``fortunes``: Debian ``fortunes`` (English prose), entries separated by ``%`` lines.
- ``wordnet``: Debian ``wordnet-base`` glosses, as ``"word: gloss"``.
- ``stdlib``: Python standard library sources, chunked at line boundaries (~300-600 chars).

Each item's split is fixed by a hash of its identity (source + text), so ``train``, ``heldout``
and ``test`` never share a text, whatever ``n_per_source`` or ``seed`` is. ``seed`` only picks
which items of a split come first; for a fixed seed a smaller ``n`` gives a prefix of a larger one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout", "test"]
SOURCES: tuple[str, ...] = ("fortunes", "wordnet", "stdlib")

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

MIN_CHARS, MAX_CHARS = 80, 800
CHUNK_MIN, CHUNK_MAX = 300, 600
# Percent of the hash space given to each split, in order: train 80, heldout 10, test 10.
_SPLIT_BOUNDS: tuple[tuple[Split, int], ...] = (("train", 80), ("heldout", 90), ("test", 100))
_FORTUNE_SKIP = frozenset({"ascii-art"})  # pictures, not prose
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_OVERSTRIKE = re.compile(r".\x08")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class CorpusMissing(RuntimeError):
    """A corpus source is not installed on this machine."""


@dataclass(frozen=True, slots=True)
class TextSample:
    source: str
    text: str


def load_corpus(split: Split, n_per_source: int, seed: int = 0) -> list[TextSample]:
    """Return ``n_per_source`` samples of each source in ``split``, interleaved round-robin."""
    if split not in ("train", "heldout", "test"):
        raise ValueError(f"unknown split {split!r}")
    if n_per_source < 0:
        raise ValueError("n_per_source must be >= 0")
    per_source: list[list[str]] = []
    for source in SOURCES:
        texts = [t for t in _texts(source) if _split_of(source, t) == split]
        if len(texts) < n_per_source:
            raise ValueError(
                f"{source}/{split} has only {len(texts)} items, asked for {n_per_source}"
            )
        texts.sort(key=lambda t, s=source: _digest(f"{seed}\0{s}\0{t}"))
        per_source.append(texts[:n_per_source])
    return [
        TextSample(source, per_source[j][i])
        for i in range(n_per_source)
        for j, source in enumerate(SOURCES)
    ]


def _digest(key: str) -> bytes:
    return hashlib.sha1(key.encode("utf-8")).digest()


def _split_of(source: str, text: str) -> Split:
    bucket = int.from_bytes(_digest(f"{source}\0{text}")[:8], "big") % 100
    return next(name for name, bound in _SPLIT_BOUNDS if bucket < bound)


def _texts(source: str) -> tuple[str, ...]:
    if source == "fortunes":
        return _fortunes(str(FORTUNES_DIR))
    if source == "wordnet":
        return _wordnet(str(WORDNET_DIR))
    return _stdlib(sysconfig.get_paths()["stdlib"])


def _keep(texts: list[str]) -> tuple[str, ...]:
    """Length filter + de-duplication (first occurrence wins, order kept)."""
    return tuple(dict.fromkeys(t for t in texts if MIN_CHARS <= len(t) <= MAX_CHARS))


def _missing(what: str, path: Path, package: str) -> CorpusMissing:
    return CorpusMissing(
        f"{what} not found at {path}. Run `make setup` (or: sudo apt-get install -y {package})."
    )


@functools.cache
def _fortunes(root: str) -> tuple[str, ...]:
    files = sorted(
        p
        for p in Path(root).glob("*")
        if p.is_file() and not p.is_symlink() and not p.suffix and p.name not in _FORTUNE_SKIP
    )
    if not files:
        raise _missing("Debian fortunes", Path(root), "fortunes")
    out: list[str] = []
    for path in files:
        raw = _OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        out.extend(e.strip() for e in re.split(r"^%$", raw, flags=re.MULTILINE))
    return _keep(out)


@functools.cache
def _wordnet(root: str) -> tuple[str, ...]:
    paths = [Path(root) / name for name in WORDNET_FILES]
    if not all(p.is_file() for p in paths):
        raise _missing("WordNet data files", Path(root), "wordnet-base")
    out: list[str] = []
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # license header
                    continue
                fields, gloss = line.split(" | ", 1)
                word = _ADJ_MARKER.sub("", fields.split()[4]).replace("_", " ")
                out.append(f"{word}: {gloss.strip()}")
    return _keep(out)


@functools.cache
def _stdlib(root: str) -> tuple[str, ...]:
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS)
        files.extend(Path(d) / n for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise CorpusMissing(f"no Python standard library sources under {root}")
    out: list[str] = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        out.extend(_chunks(lines))
    return _keep(out)


def _chunks(lines: list[str]) -> list[str]:
    """Group lines into chunks of about CHUNK_MIN..CHUNK_MAX characters."""
    out: list[str] = []
    buf: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        text = "".join(buf).strip("\n")
        if text.strip():
            out.append(text)
        buf.clear()
        size = 0

    for line in lines:
        if buf and size + len(line) > CHUNK_MAX:
            flush()
        buf.append(line)
        size += len(line)
        if size >= CHUNK_MIN:
            flush()
    if buf:
        flush()
    return out
