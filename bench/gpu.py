"""`python -m bench.gpu`: decode throughput of the runtime on a GPU, qwen15's and qwen05's
shapes with random weights (no weight files: a GPU machine may have no registry access).

Per model x quantization (bf16, int8, int4) x batch (1, 8, 32): B sequences are prefilled
with a short prompt, then S decode steps run through `ExitDecoder.decode` (no exits) as a
server runs them: the CUDA-graph step (`compile_decode`, static KV slots), the LM head and
the greedy argmax; tok/s = B * S / time. The eager path (no graphs, dynamic caches) runs
the same steps in bf16 at each batch, for the graph/eager ratio measured in the same run.

Achieved memory bandwidth = (bytes of every weight a step reads + the KV it attends over)
/ step time, against the card's peak: from a table of known cards by name, else measured
here with a large device-to-device copy (2 x bytes / time). Random weights cost what real
ones do: the same shapes, dtypes and kernels.

Writes docs/bench/gpu.md (`--out`); `--device cpu --smoke` runs tiny shapes on the CPU
(eager, bf16/int8, seconds) to prove the script end to end and writes nothing unless
`--out` is given. Needs only torch (+ tandem.runtime, which imports nothing else).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.runtime.config import ArchConfig
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.device import resolve_device
from tandem.runtime.model import DecoderModel, Rope
from tandem.runtime.quant import quantize_model

# config.json values of the converted models (model_cache/converted/<id>/config.json)
SHAPES = {
    "qwen15": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2),
    "qwen05": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
QWEN2_COMMON = dict(
    model_type="qwen2",
    vocab_size=151936,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    eos_token_id=151645,
)

# Peak memory bandwidth, GB/s, by a substring of torch.cuda.get_device_name (vendor specs).
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("T4", 320.0),
    ("Orin", 204.8),  # AGX Orin 64GB; the Orin NX / Nano have less
)


@dataclass
class Row:
    model: str
    quant: str
    batch: int
    path: str  # "graph" | "eager"
    steps: int
    seconds: float
    bytes_per_step: float

    @property
    def tok_s(self) -> float:
        return self.batch * self.steps / self.seconds

    @property
    def step_ms(self) -> float:
        return 1e3 * self.seconds / self.steps

    @property
    def gbps(self) -> float:
        return self.bytes_per_step * self.steps / self.seconds / 1e9


def arch_config(name: str, smoke: bool) -> ArchConfig:
    cfg = {**QWEN2_COMMON, **SHAPES[name]}
    if smoke:
        cfg["vocab_size"] = 512
    return ArchConfig.from_hf(cfg)


def random_model(cfg: ArchConfig, device: torch.device, max_context: int) -> DecoderModel:
    """bf16 weights ~ N(0, 0.02) (norms 1), made on the device; no weight file."""
    with torch.device("meta"):
        model = DecoderModel(cfg, max_context)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.rope = Rope(cfg.head_dim, cfg.rope_theta, model.max_context)
    model.eval()
    if device.type != "cpu":
        model.to_device(device)
    return model


def weight_bytes(model: DecoderModel) -> int:
    """Bytes a decode step reads: every parameter and buffer except the embedding table
    (one row per token) and the rope tables."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("embed_tokens"):
            continue
        total += t.numel() * t.element_size()
    return total


def kv_bytes(cfg: ArchConfig, batch: int, mean_length: float) -> float:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * batch * mean_length


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_decode(
    model: DecoderModel, batch: int, prompt_len: int, warm: int, steps: int
) -> tuple[float, float]:
    """Seconds for `steps` greedy decode steps of `batch` sequences (after `warm` steps)
    and the mean attended length."""
    dev = model.device
    dec = ExitDecoder(model)
    seqs = [dec.new_sequence() for _ in range(batch)]
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    with torch.inference_mode():
        res = dec.prefill(seqs, prompts)
        toks = [int(r.logits.argmax()) for r in res]
        for _ in range(warm):
            toks = [int(r.logits.argmax()) for r in dec.decode(seqs, toks)]
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            res = dec.decode(seqs, toks)
            toks = torch.stack([r.logits.argmax() for r in res]).tolist()
        sync(dev)
        seconds = time.perf_counter() - t0
    for s in seqs:
        release = getattr(s.kv, "release", None)
        if release:
            release()
    return seconds, prompt_len + warm + steps / 2


def card_peak(device: torch.device) -> tuple[str, float, str]:
    """(name, peak GB/s, where the peak comes from)."""
    if device.type != "cuda":
        return platform.processor() or "cpu", measure_copy_gbps(device), "measured copy"
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key in name:
            return name, gbps, f"spec sheet ({key})"
    return name, measure_copy_gbps(device), "measured device-to-device copy"


def measure_copy_gbps(device: torch.device, mib: int = 1024) -> float:
    n = mib * 2**20 // 4 if device.type == "cuda" else 64 * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9


def bench(args) -> tuple[list[Row], list[str]]:
    choice = resolve_device(args.device)
    dev = choice.torch_device
    rows: list[Row] = []
    notes: list[str] = []
    models = ["tiny"] if args.smoke else args.models.split(",")
    quants = args.quants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    deadline = time.perf_counter() + args.budget_s
    for name in models:
        cfg = arch_config(name, args.smoke)
        for quant in quants:
            if quant == "int4" and dev.type != "cuda":
                notes.append(f"{name} int4: skipped (the CUDA int4 kernel needs a GPU)")
                continue
            if time.perf_counter() > deadline:
                notes.append(f"{name} {quant}: skipped (time budget {args.budget_s:.0f} s)")
                continue
            model = random_model(cfg, dev, args.max_context)
            if quant != "bf16":
                quantize_model(
                    model, quant, skip=("embed_tokens",), device=dev if dev.type == "cuda" else None
                )
            wbytes = weight_bytes(model)
            paths = ["eager"]
            if dev.type == "cuda":
                paths = ["graph", "eager"] if quant == "bf16" else ["graph"]
            for path in paths:
                model.compiled = None
                if path == "graph":
                    model.compile_decode(max(batches))
                for b in batches:
                    secs, mean_len = run_decode(model, b, args.prompt, args.warm, args.steps)
                    per_step = wbytes + kv_bytes(cfg, b, mean_len)
                    row = Row(name, quant, b, path, args.steps, secs, per_step)
                    rows.append(row)
                    print(
                        f"{name:7s} {quant:5s} {path:5s} B={b:3d}: {row.tok_s:9.1f} tok/s "
                        f"{row.step_ms:7.2f} ms/step {row.gbps:8.1f} GB/s",
                        flush=True,
                    )
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows, notes


def report(rows: list[Row], notes: list[str], args, card: str, peak: float, src: str) -> str:
    dev = resolve_device(args.device).torch_device
    lines = [
        "# Decode on a GPU (`make gpu-check`)",
        "",
        f"Card: **{card}**; peak memory bandwidth {peak:.0f} GB/s ({src}). torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}.",
        "",
        f"Random weights with the models' shapes (bench/gpu.py), {args.prompt}-token prompts, "
        f"{args.warm} warm-up then {args.steps} timed greedy decode steps per batch through "
        "`ExitDecoder.decode` (no exits): the CUDA-graph step over static KV slots "
        "(`graph`), and for bf16 the eager path (`eager`) in the same run. Bandwidth = "
        "(weights read per step + KV attended) / step time; % = of the peak above.",
        "",
        "| model | quant | batch | path | tok/s | ms/step | GB/s | % of peak | graph / eager |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    eager = {(r.model, r.quant, r.batch): r for r in rows if r.path == "eager"}
    for r in rows:
        e = eager.get((r.model, "bf16", r.batch))
        ratio = f"{r.tok_s / e.tok_s:.2f}x" if r.path == "graph" and e else ""
        lines.append(
            f"| {r.model} | {r.quant} | {r.batch} | {r.path} | {r.tok_s:.1f} | "
            f"{r.step_ms:.2f} | {r.gbps:.1f} | {100 * r.gbps / peak:.0f}% | {ratio} |"
        )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", f"Device: {dev}; command: `{' '.join(sys.argv)}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (any device)")
    p.add_argument("--models", default="qwen15,qwen05")
    p.add_argument("--quants", default=None, help="default bf16,int8,int4 (smoke: bf16,int8)")
    p.add_argument("--batches", default=None, help="default 1,8,32 (smoke: 1,2)")
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--warm", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new configs")
    p.add_argument("--out", default=None, help="default docs/bench/gpu.md (smoke: none)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.quants = args.quants or ("bf16,int8" if smoke else "bf16,int8,int4")
    args.batches = args.batches or ("1,2" if smoke else "1,8,32")
    args.prompt = args.prompt or (8 if smoke else 32)
    args.warm = args.warm if args.warm is not None else (1 if smoke else 8)
    args.steps = args.steps or (4 if smoke else 64)
    if smoke:
        args.max_context = min(args.max_context, 128)
    out = args.out or (None if smoke else "docs/bench/gpu.md")
    dev = resolve_device(args.device).torch_device
    card, peak, src = card_peak(dev)
    print(f"device {dev} ({card}), peak {peak:.0f} GB/s ({src})", flush=True)
    rows, notes = bench(args)
    text = report(rows, notes, args, card, peak, src)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
