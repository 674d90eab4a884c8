"""The checked-in gRPC stubs are what the pinned grpcio-tools makes of proto/v1/*.proto."""

from __future__ import annotations

import subprocess
import sys

from splitserve.proto.v1 import api_pb2


def test_generated_stubs_are_fresh():
    r = subprocess.run([sys.executable, "-m", "splitserve.proto.generate", "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_public_api_shape():
    """The v1 contract: package, RPCs, and that every stream event carries the request id and a seq."""
    service = api_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "splitserve.v1.Generation"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Resume", "Abort", "GetModelInfo", "GetLoad"}
    assert methods["Generate"].server_streaming and methods["Resume"].server_streaming
    events = api_pb2.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in events.fields] == ["chunk", "complete", "error"]
    for f in events.fields:
        assert {"request_id", "seq"} <= set(f.message_type.fields_by_name), f.name
    assert set(api_pb2.ResumeRequest.DESCRIPTOR.fields_by_name) == {"request_id", "last_seq"}
