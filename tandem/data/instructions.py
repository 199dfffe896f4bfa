"""Chat instruction prompts built from the offline corpora (fortunes, WordNet, stdlib).

Used to self-distil early-exit heads on the kind of text an edge node serves: a model's own
greedy answers to chat requests. Each prompt wraps one corpus text in a task template
(explain, summarise, define, write code, ...). The template is picked by a hash of the text,
so a prompt set is deterministic. Prompts of different splits never share a corpus text
(the corpus splits are disjoint by construction, see tandem.data.corpus), so evaluation
prompts (split ``heldout``) are disjoint from training prompts (split ``train``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tandem.data.corpus import Split, TextSample, load_corpus

_FORTUNE_TASKS = (
    "Explain the meaning of this quote in two or three sentences:\n\n{text}",
    "Summarize the following text in one sentence:\n\n{text}",
    "Why might someone find this funny or wise?\n\n{text}",
    "Rewrite this in plain, simple English:\n\n{text}",
    "Write a short reply to this, as a friendly assistant:\n\n{text}",
    "What is the main idea of this passage?\n\n{text}",
)
_WORD_TASKS = (
    'What does the word "{word}" mean? Give an example sentence.',
    'Define "{word}" and list two related words.',
    'Use the word "{word}" in three different sentences.',
    'Explain "{word}" to a child.',
    "Here is a dictionary entry:\n\n{text}\n\nExplain it in your own words.",
)
_CODE_TASKS = (
    "Explain what this Python code does:\n\n```python\n{text}\n```",
    "Add comments to this Python code:\n\n```python\n{text}\n```",
    "Summarize this Python code in a few bullet points:\n\n```python\n{text}\n```",
    "Find possible bugs or improvements in this code:\n\n```python\n{text}\n```",
)
_FUNC_TASKS = (
    "Write a Python function `{sig}` that {doc}",
    "Implement `{sig}` in Python. It should {doc}",
)
_DEF = re.compile(r"def (\w+)\(([^)]*)\)[^:]*:\s*\n\s*(?:\"\"\"|''')\s*([^\n]+)")


@dataclass(frozen=True, slots=True)
class Instruction:
    source: str  # corpus source the prompt was built from
    task: int  # template index within the source's templates
    prompt: str  # the user message


def _pick(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % n


def _clip(text: str, max_chars: int) -> str:
    """At most `max_chars`, cut at a line end where there is one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip()


def instruction_of(sample: TextSample, max_chars: int = 400) -> Instruction:
    text = _clip(sample.text.strip(), max_chars)
    key = f"{sample.source}\0{text}"
    if sample.source == "fortunes":
        i = _pick(key, len(_FORTUNE_TASKS))
        return Instruction("fortunes", i, _FORTUNE_TASKS[i].format(text=text))
    if sample.source == "wordnet":
        word = text.split(":", 1)[0].strip()
        i = _pick(key, len(_WORD_TASKS))
        return Instruction("wordnet", i, _WORD_TASKS[i].format(word=word, text=text))
    m = _DEF.search(text)
    if m and _pick(key + "\0f", 2) == 0:
        name, args, doc = m.group(1), m.group(2).strip(), m.group(3).strip().rstrip('"')
        doc = doc[:1].lower() + doc[1:]
        i = _pick(key, len(_FUNC_TASKS))
        task = _FUNC_TASKS[i].format(sig=f"{name}({args})", doc=doc)
        return Instruction("stdlib-func", i, task)
    i = _pick(key, len(_CODE_TASKS))
    return Instruction("stdlib", i, _CODE_TASKS[i].format(text=text))


# The training prompts: self-distillation draws its prompts from the first ones of
# load_instructions("train", TRAIN_POOL) (a prefix of a longer list, so the pool can grow),
# and evaluation on the heldout split excludes all of them.
TRAIN_POOL = 7200


def load_instructions(
    split: Split, n: int, seed: int = 0, max_chars: int = 400, exclude: frozenset[str] = frozenset()
) -> list[Instruction]:
    """`n` instruction prompts from the corpus `split`, sources interleaved, corpus texts
    clipped to `max_chars`; prompts in `exclude` (e.g. the training prompts: two WordNet
    senses of one word give the same "define" prompt) are skipped. For a fixed seed a
    smaller `n` gives a prefix of a larger one."""
    per_source = -(-n // 3)
    while True:
        out = [
            x
            for x in (instruction_of(s, max_chars) for s in load_corpus(split, per_source, seed))
            if x.prompt not in exclude
        ]
        if len(out) >= n:
            return out[:n]
        per_source *= 2
