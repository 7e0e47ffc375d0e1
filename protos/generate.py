"""Generates serving/proto_gen from protos/ (`make proto`); tests/test_proto.py fails when
the checked-in code is stale.

protoc writes imports from the proto path (`from recur.v1 import recur_pb2`), which would
collide with the `recur` command package, so the generated imports are rewritten to
`serving.proto_gen.recur.v1` (and `serving.proto_gen.inference` for the Open Inference
Protocol's files).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "serving" / "proto_gen"
PACKAGE = "serving.proto_gen"


def generate(out: Path) -> list[Path]:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(Path(tmp).rglob("*.py*")):
            text = re.sub(r"^from (recur\.v1|inference) import", rf"from {PACKAGE}.\1 import",
                          path.read_text(), flags=re.M)
            target = out / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        (folder / "__init__.py").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
