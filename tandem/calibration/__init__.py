"""Early-exit calibration: collect teacher data, distil exit heads, evaluate, report.

`python -m tandem.calibration` (or `make calibrate`) runs it for the default models and
writes `artifacts/exits/<model>.pt` plus `docs/bench/exits.{md,json}`.
"""
