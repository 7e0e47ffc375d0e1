"""The generated protobuf code is what `make proto` makes from protos/ today."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    generate = runpy.run_path(str(REPO / "protos" / "generate.py"))["generate"]
    generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    checked_in = {p.relative_to(REPO / "serving" / "proto_gen"): p.read_bytes()
                  for p in (REPO / "serving" / "proto_gen").rglob("*.py*")
                  if "__pycache__" not in p.parts}
    stale = sorted(str(p) for p in fresh.keys() | checked_in.keys()
                   if fresh.get(p) != checked_in.get(p))
    assert not stale, f"serving/proto_gen is stale ({', '.join(stale)}): run `make proto`"
