"""Teacher-forced evaluation of exit heads on held-out text, and the report writer.

Every token of the held-out texts runs through the full model once; at each exit we compare
with the final layer's argmax (the token full-depth greedy decoding would emit):

- top-1 agreement of the trained head, and of the untrained logit lens (the model's final
  norm and full LM head applied to the exit hidden state), for comparison;
- the head's calibration: per confidence bin, count, mean confidence and accuracy;
- per threshold tau, the exit policy of `ExitDecoder` (first exit whose top class is a
  shortlisted token with probability >= tau; no exits at tau >= 1): the fraction of tokens
  leaving at each exit, the agreement of the exited tokens, and the layers computed.

These numbers are teacher-forced (every position sees the true prefix), not free-running.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from tandem.calibration.collect import Activations, logit_chunk_rows
from tandem.runtime.exit_head import ExitHead, decide
from tandem.runtime.model import DecoderModel

TAUS = (0.6, 0.8, 0.9, 1.0)
BIN_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MACHINE = "2-core AMD EPYC CPU (x86-64, AVX-512 BF16), no GPU; PyTorch CPU, 2 threads"


def _r(x: float) -> float:
    return round(float(x), 4)


@torch.inference_mode()
def evaluate_heads(
    model: DecoderModel, heads: Sequence[ExitHead], acts: Activations, taus=TAUS
) -> dict:
    """Metrics of `heads` (as loaded for serving) on teacher-forced activations `acts`."""
    n_layers = model.cfg.n_layers
    ref = acts.final_argmax
    n = ref.shape[0]
    chunk = logit_chunk_rows(model.cfg.vocab_size)
    exits, confident_p, tokens, is_token = [], [], [], []
    for head, hidden in zip(heads, acts.hidden, strict=True):
        k = head.shortlist.shape[0]
        top_p, top_tok, top_is_tok, lens, best_tok = [], [], [], [], []
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            logits = head(h)
            d = decide(logits, head.shortlist, 1.0)  # confident at tau <=> is_tok & p >= tau
            is_tok = logits.argmax(-1) < k
            top_p.append(d.prob)
            top_is_tok.append(is_tok)
            top_tok.append(torch.where(is_tok, d.token, torch.full_like(d.token, -1)))
            best_tok.append(head.shortlist[logits[:, :k].argmax(-1)])
            lens.append(model.logits(h).float().argmax(-1))
        p, tok, tok_ok, lens_tok, best = (
            torch.cat(x) for x in (top_p, top_tok, top_is_tok, lens, best_tok)
        )
        correct = tok == ref
        bins = []
        for i, (lo, hi) in enumerate(zip(BIN_EDGES[:-1], BIN_EDGES[1:], strict=True)):
            upper = p <= hi if i == len(BIN_EDGES) - 2 else p < hi
            sel = (p >= lo) & upper
            cnt = int(sel.sum())
            bins.append(
                {
                    "bin": f"{lo:.1f}-{hi:.1f}",
                    "count": cnt,
                    "mean_confidence": _r(p[sel].mean()) if cnt else None,
                    "accuracy": _r(correct[sel].float().mean()) if cnt else None,
                }
            )
        exits.append(
            {
                "layer": head.cfg.layer,
                "head_top1": _r(correct.float().mean()),
                "head_top1_tokens": _r((best == ref).float().mean()),
                "lens_top1": _r((lens_tok == ref).float().mean()),
                "shortlist_coverage": _r(torch.isin(ref, head.shortlist).float().mean()),
                "head_top_is_other": _r((~tok_ok).float().mean()),
                "mean_confidence": _r(p.mean()),
                "calibration": bins,
            }
        )
        confident_p.append(p)
        tokens.append(tok)
        is_token.append(tok_ok)
    policy = []
    for tau in taus:
        exit_at = torch.full((n,), n_layers, dtype=torch.long)
        out = ref.clone()
        exited = torch.zeros(n, dtype=torch.bool)
        fractions = []
        for head, p, tok, ok in zip(heads, confident_p, tokens, is_token, strict=True):
            leave = ok & (p >= tau) & ~exited if tau < 1.0 else torch.zeros_like(exited)
            exit_at[leave] = head.cfg.layer
            out[leave] = tok[leave]
            exited |= leave
            fractions.append(_r(leave.float().mean()))
        n_exited = int(exited.sum())
        layers = exit_at.float().mean() / n_layers
        policy.append(
            {
                "tau": tau,
                "exit_fraction": fractions,
                "exited": _r(n_exited / n),
                "exited_agreement": _r((out[exited] == ref[exited]).float().mean())
                if n_exited
                else None,
                "overall_agreement": _r((out == ref).float().mean()),
                "layer_fraction": _r(layers),
                "layer_savings": _r(1.0 - layers),
            }
        )
    return {"tokens": n, "texts": acts.n_texts, "exits": exits, "tau": policy}


# ---- report --------------------------------------------------------------------------------


def update_report(json_path: Path, model_id: str, entry: dict) -> dict:
    """Merge one model's results into the report JSON (other models' entries are kept)."""
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    report["machine"] = MACHINE
    report["method"] = "teacher-forced, held-out corpus split; reference = final-layer argmax"
    models = report.setdefault("models", {})
    models[model_id] = entry
    order = ["smollm2", "gemma3", "qwen05", "qwen15"]
    report["models"] = dict(
        sorted(models.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0]))
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(report: dict) -> str:
    lines = [
        "# Early-exit heads: teacher-forced evaluation",
        "",
        "Generated by `make calibrate` (`python -m tandem.calibration`); do not edit by hand.",
        "Raw numbers: [`exits.json`](exits.json).",
        "",
        f"- Machine: {report['machine']}.",
        "- **Teacher-forced** numbers: every position sees the true held-out text as prefix",
        "  (corpus split `heldout`, disjoint from the `train` split the heads were fitted on).",
        "  The reference is the final layer's argmax, i.e. what full-depth greedy decoding",
        "  would emit at that position. Free-running agreement can differ.",
        "- *head top-1*: trained exit head's top class equals the final argmax (an `other`",
        "  top class counts as a miss); *(tokens)*: the same, ignoring `other`, i.e. the head's",
        "  best shortlisted token. *logit lens*: the model's own final norm + full LM head",
        "  on the exit hidden state, untrained. *coverage*: final argmax is in the shortlist",
        "  (upper bound for the head).",
        "- Exit policy as in `ExitDecoder`: a token leaves at the first exit whose top class is a",
        "  shortlisted token with probability >= tau; no exits at tau = 1.0. *layers* = mean",
        "  layers computed / n_layers (head cost not counted); *agreement (all)* counts",
        "  full-depth tokens as agreeing.",
        "",
    ]
    for model_id, m in report["models"].items():
        tr, ev = m["train"], m["eval"]
        lines += [
            f"## {model_id}",
            "",
            f"`{m['upstream']}`, {m['n_layers']} layers, exits after layers "
            f"{', '.join(str(e) for e in m['exit_layers'])}; shortlist K = {m['shortlist_size']}"
            f" (+ other), adapter rank {m['rank']}, artifact `{m['artifact']['path']}` "
            f"({m['artifact']['bytes'] / 1e6:.2f} MB).",
            f"Trained on {tr['tokens']} tokens from {tr['texts']} train texts "
            f"({tr['val_tokens']} held out for early stopping); evaluated on {ev['tokens']} "
            f"tokens from {ev['texts']} held-out texts.",
            "",
        ]
        rows = []
        for ex, hs in zip(ev["exits"], tr["heads"], strict=True):
            rows.append(
                [
                    ex["layer"],
                    f"**{_pct(ex['head_top1'])}**",
                    _pct(ex["head_top1_tokens"]),
                    _pct(ex["lens_top1"]),
                    _pct(ex["shortlist_coverage"]),
                    _pct(ex["head_top_is_other"]),
                    f"{hs['val_kl_init']:.3f} → {hs['val_kl']:.3f}",
                ]
            )
        header = ["exit layer", "head top-1", "head top-1 (tokens)", "logit lens top-1"]
        header += ["coverage", "top = other"]
        lines += _table([*header, "val KL (init → trained)"], rows)
        lines += ["", "Calibration (head top probability vs agreement with the final argmax):", ""]
        header = ["confidence"] + [f"L{ex['layer']}: n / conf / acc" for ex in ev["exits"]]
        rows = []
        for i, b in enumerate(ev["exits"][0]["calibration"]):
            row = [b["bin"]]
            for ex in ev["exits"]:
                c = ex["calibration"][i]
                conf = "–" if c["mean_confidence"] is None else f"{c['mean_confidence']:.3f}"
                row.append(f"{c['count']} / {conf} / {_pct(c['accuracy'])}")
            rows.append(row)
        lines += _table(header, rows)
        lines += ["", "Exit policy by threshold:", ""]
        header = (
            ["tau"]
            + [f"exit @L{ex['layer']}" for ex in ev["exits"]]
            + ["exited", "agreement (exited)", "agreement (all)", "layers", "savings"]
        )
        rows = []
        for t in ev["tau"]:
            rows.append(
                [f"{t['tau']:.1f}"]
                + [_pct(f) for f in t["exit_fraction"]]
                + [
                    _pct(t["exited"]),
                    _pct(t["exited_agreement"]),
                    _pct(t["overall_agreement"]),
                    f"{t['layer_fraction']:.3f}",
                    _pct(t["layer_savings"]),
                ]
            )
        lines += _table(header, rows)
        if "timing_s" in m:
            ts = m["timing_s"]
            lines += [
                "",
                f"Calibration wall time on this machine: {ts['total']:.0f} s (load "
                f"{ts['load']:.0f}, collect {ts['collect']:.0f}, train {ts['train']:.0f}, "
                f"eval {ts['eval']:.0f}).",
            ]
        lines.append("")
    lines += [
        "## Measured speed-up (decoder)",
        "",
        "_Placeholder: filled by `make bench-edge` with measured wall-clock speed-up and",
        "free-running greedy agreement of the actual `ExitDecoder` against full depth._",
        "",
    ]
    return "\n".join(lines)


def write_report(report_dir: Path, model_id: str, entry: dict) -> None:
    report = update_report(report_dir / "exits.json", model_id, entry)
    (report_dir / "exits.md").write_text(render_markdown(report))
