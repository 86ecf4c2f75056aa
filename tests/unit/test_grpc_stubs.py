"""The committed gRPC stubs are what protoc makes of the committed .proto (run `make protos` after editing it)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")
_spec = importlib.util.spec_from_file_location("compile_protos", Path(__file__).parents[2] / "protos" / "compile.py")
_compile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compile)
ROOT, compile_protos = _compile.ROOT, _compile.compile_protos


def test_committed_stubs_match_the_proto(tmp_path: Path):
    fresh = compile_protos(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed.name} is not committed: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed.name} is stale: run `make protos`"


def test_stubs_import_as_the_proto_package():
    from specserve.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "specserve.v1"
    assert hasattr(generation_pb2_grpc, "GenerationStub")
