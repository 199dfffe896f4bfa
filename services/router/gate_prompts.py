"""The gate's prompts: eight kinds of offline text and task, each cut into a prompt and the
reference continuation every expert is scored on.

Domains (the unit the leave-one-domain-out evaluation leaves out):

- ``fortunes``, ``wordnet``, ``stdlib``: corpus continuations (tandem.data.corpus): prose,
  WordNet glosses, Python standard library source.
- ``pydoc``: the Python language reference as shipped in ``pydoc_data.topics`` (technical
  prose with grammar snippets), chunked.
- ``licenses``: licence and copyright notices (``/usr/share/common-licenses``,
  ``/usr/share/doc/*/copyright``), chunked: legal prose.
- ``chat-define``: a chat turn asking what a word means; the reference answer is its WordNet
  gloss.
- ``chat-code``: a chat turn asking for a Python function from its signature and docstring
  summary; the reference answer is the stdlib's code of that function.
- ``chat-quote``: a chat turn asking to finish a quotation; the reference answer is the rest
  of the fortune.

Chat items are scored behind each expert's own chat template (as the edge node serves
them); the gate sees the user message (as ``features.gate_text`` gives it). A corpus text
feeds exactly one domain (fortunes vs chat-quote, wordnet vs chat-define, stdlib vs
chat-code are split by a hash of the text), so leaving a domain out leaves its texts out.
Man pages and dictionary databases other than WordNet are never read here: an outside
evaluation uses them.

Every item keeps the corpus's hash split of its text (train / heldout / test), so the
production gate's train / val / test split stays disjoint by text as before.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.data.corpus import load_corpus

DOMAINS: tuple[str, ...] = (
    "fortunes",
    "wordnet",
    "stdlib",
    "pydoc",
    "licenses",
    "chat-define",
    "chat-code",
    "chat-quote",
)
LICENSE_DIRS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
_SPLIT_BOUNDS = (("train", 80), ("heldout", 90), ("test", 100))
_DEF = re.compile(r"^( *)def (\w+)\(([^)]*)\)[^:\n]*:\s*\n\s*(?:\"\"\"|''')\s*([^\n\"']+)", re.M)


@dataclass(frozen=True, slots=True)
class GateItem:
    """One prompt. ``chat``: ``prompt`` is the user message (scored behind the expert's chat
    template); else ``prompt`` is raw text continued by ``continuation``."""

    domain: str
    split: str  # train | heldout | test, by a hash of the source text
    prompt: str
    continuation: str
    chat: bool = False

    @property
    def gate_text(self) -> str:
        return self.prompt


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> str:
    bucket = _digest(key) % 100
    return next(name for name, bound in _SPLIT_BOUNDS if bucket < bound)


def _side(text: str, salt: str) -> int:
    """Which of two domains sharing a source gets this text (0 or 1)."""
    return _digest(f"{salt}\0{text}") % 2


def _chunks(text: str, lo: int = 300, hi: int = 600) -> Iterator[str]:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        if buf and size + len(line) > hi:
            yield "".join(buf).strip()
            buf, size = [], 0
        buf.append(line)
        size += len(line)
        if size >= lo:
            yield "".join(buf).strip()
            buf, size = [], 0
    if buf:
        yield "".join(buf).strip()


def pydoc_texts() -> list[str]:
    import pydoc_data.topics as topics

    out = [c for k in sorted(topics.topics) for c in _chunks(topics.topics[k])]
    return list(dict.fromkeys(c for c in out if 120 <= len(c) <= 800))


def license_texts(dirs: tuple[Path, ...] = LICENSE_DIRS) -> list[str]:
    files = sorted(p for p in dirs[0].glob("*") if p.is_file() and not p.is_symlink())
    files += sorted(dirs[1].glob("*/copyright"))
    out: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.extend(_chunks(text))
    # Real sentences only: drop chunks that are mostly field lists or punctuation.
    keep = (c for c in out if 120 <= len(c) <= 800 and sum(ch.isalpha() for ch in c) > len(c) / 2)
    return list(dict.fromkeys(keep))


def _corpus(source: str, n: int) -> list[tuple[str, str]]:
    """(text, split) of up to n corpus texts of one source from every corpus split."""
    out = []
    for split in ("train", "heldout", "test"):
        share = max(1, n * {"train": 8, "heldout": 1, "test": 1}[split] // 10)
        while True:  # load_corpus asks every source for `share`: the smallest one bounds it
            try:
                got = load_corpus(split, share, seed=7)  # type: ignore[arg-type]
                break
            except ValueError:
                share //= 2
        out += [(s.text, split) for s in got if s.source == source]
    return out


def _order(items: list[tuple[str, str]], salt: str) -> list[tuple[str, str]]:
    return sorted(items, key=lambda t: _digest(f"{salt}\0{t[0]}"))


def raw_items(domain: str, texts: list[tuple[str, str]]) -> Iterator[GateItem]:
    """Raw continuations: the item's text, to be cut later (``GateItem.prompt`` is the whole
    text here, ``continuation`` empty)."""
    for text, split in texts:
        yield GateItem(domain, split, text, "")


def chat_define(texts: list[tuple[str, str]]) -> Iterator[GateItem]:
    for text, split in texts:
        word, _, gloss = text.partition(":")
        gloss = gloss.strip().split(";")[0].strip()
        if word and len(gloss) >= 16:
            yield GateItem("chat-define", split, f'What does "{word.strip()}" mean?', gloss, True)


def chat_code(texts: list[tuple[str, str]], cont_chars: int) -> Iterator[GateItem]:
    for text, split in texts:
        m = _DEF.search(text)
        if m is None:
            continue
        indent, name, args, doc = m.groups()
        doc = doc.strip().rstrip(".")
        if len(doc) < 12:
            continue
        # The function's code after its docstring, dedented by the def's indent: the part
        # of an answer the prompt does not already spell out.
        quote = text[m.end(4) - len(m.group(4)) - 3 : m.end(4) - len(m.group(4))]
        close = text.find(quote, m.end(4))
        if close < 0:
            continue
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in text[close + 3 :].lstrip("\n").splitlines()
        ]
        answer = "\n".join(body).strip("\n")[: cont_chars * 2]
        if len(answer) < 16:
            continue
        task = f"Write a Python function `{name}({args.strip()})` that does this: {doc}."
        yield GateItem("chat-code", split, task, answer, True)


def chat_quote(texts: list[tuple[str, str]]) -> Iterator[GateItem]:
    for text, split in texts:
        words = text.split()
        if len(words) < 12:
            continue
        half = len(words) // 2
        head, tail = " ".join(words[:half]), " ".join(words[half:])
        yield GateItem("chat-quote", split, f"Finish this quotation:\n\n{head} ...", tail, True)


def domain_items(n_per_domain: int, cont_chars: int) -> dict[str, list[GateItem]]:
    """Candidate items per domain (spares included: raw ones may have no aligned cut), in
    a fixed hash order. Raw items carry the whole text in ``prompt``."""
    spare = 2 * n_per_domain
    out: dict[str, list[GateItem]] = {}
    for source, raw, chat in (
        ("fortunes", "fortunes", "chat-quote"),
        ("wordnet", "wordnet", "chat-define"),
        ("stdlib", "stdlib", "chat-code"),
    ):
        # chat-code finds a def with a docstring in few stdlib chunks: read many.
        texts = _order(_corpus(source, 24 * spare if source == "stdlib" else 2 * spare), source)
        mine = [t for t in texts if _side(t[0], source) == 0]
        theirs = [t for t in texts if _side(t[0], source) == 1]
        out[raw] = list(raw_items(raw, mine[:spare]))
        if chat == "chat-quote":
            out[chat] = list(chat_quote(theirs))[:spare]
        elif chat == "chat-define":
            out[chat] = list(chat_define(theirs))[:spare]
        else:
            out[chat] = list(chat_code(theirs, cont_chars))[:spare]
    for name, texts in (("pydoc", pydoc_texts()), ("licenses", license_texts())):
        labelled = _order([(t, split_of(f"{name}\0{t}")) for t in texts], name)
        out[name] = list(raw_items(name, labelled[:spare]))
    return {d: out[d] for d in DOMAINS}
