"""Regenerate the checked-in protobuf / gRPC stubs from proto/v1/*.proto with the pinned grpcio-tools.

    python -m splitserve.proto.generate          # rewrite proto/v1/*_pb2*.py
    python -m splitserve.proto.generate --check  # exit 1 when the checked-in stubs are stale

The .proto files live at proto/v1/ and declare `package splitserve.v1`; they are compiled as if they sat at
splitserve/proto/v1/ so the generated imports read `from splitserve.proto.v1 import ..._pb2`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "v1"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    root = Path(tempfile.mkdtemp(prefix="splitserve-proto-"))
    pkg = root / "splitserve" / "proto" / "v1"
    pkg.mkdir(parents=True)
    protos = sorted(HERE.glob("*.proto"))
    for p in protos:
        shutil.copy(p, pkg / p.name)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}"] + [str(pkg / p.name) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(p.name for p in protos)}")
    produced = sorted(f for f in pkg.iterdir() if f.suffix in (".py", ".pyi"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in produced:
        shutil.copy(f, out_dir / f.name)
    shutil.rmtree(root)
    return [out_dir / f.name for f in produced]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the checked-in stubs differ from a fresh build")
    args = ap.parse_args(argv)
    if not args.check:
        for f in generate(HERE):
            print(f"wrote {f}")
        return 0
    fresh = Path(tempfile.mkdtemp(prefix="splitserve-proto-check-"))
    stale = [f.name for f in generate(fresh) if not (HERE / f.name).exists() or not filecmp.cmp(f, HERE / f.name, shallow=False)]
    shutil.rmtree(fresh)
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run `python -m splitserve.proto.generate`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
