"""Convert the shipped GGUF models into Tandem's cache ($TANDEM_CACHE, default model_cache)
once, so the serving containers that share the cache volume only read it.

    python deploy/docker/convert_models.py [model ids...]   # default: every registry model

`ensure_converted` is not safe against two processes converting the same model at once, so
the compose file runs this as a one-shot `model-init` service before any model service starts.
Already converted models are skipped (about a second each).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelRegistry


def main(argv: list[str]) -> int:
    registry = ModelRegistry()
    cache = Path(os.environ.get("TANDEM_CACHE", "model_cache"))
    ids = argv or list(registry.ids())
    for model_id in ids:
        try:
            spec = registry.get(model_id)
        except KeyError as exc:
            print(f"convert-models: {exc}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        path = ensure_converted(spec, cache)
        print(
            f"convert-models: {model_id} -> {path} ({time.perf_counter() - t0:.1f} s)", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
