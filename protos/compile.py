"""Regenerates the Python stubs of protos/specserve/v1/*.proto (`make protos`; a test checks they are current).

The stubs are committed so that users need no protoc; they import as `specserve.v1.<name>_pb2`, matching the
proto package, because pyproject maps the package `specserve.v1` to protos/specserve/v1.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted((ROOT / "specserve" / "v1").glob("*.proto"))


def compile_protos(out_dir: Path = ROOT) -> list[Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py of every proto under out_dir/specserve/v1/."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rel = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *rel]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "specserve" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in compile_protos():
        print(path, file=sys.stderr)
