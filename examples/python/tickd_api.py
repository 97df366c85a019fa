"""Generates the Python code for tickd's API from ../../proto on first import (and again when the
proto changes), and exposes it. google.api annotations come from googleapis-common-protos.

    from tickd_api import pb, rpc   # tickd.v1 messages and the SchedulerStub
"""

import importlib
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
OUT = Path(__file__).resolve().parent / "_generated"


def _generate():
    OUT.mkdir(exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        str(_PROTO),
    ])
    if code != 0:
        raise RuntimeError(f"protoc failed with {code}")


_PROTO = PROTO_ROOT / "tickd" / "v1" / "scheduler.proto"
_GENERATED = OUT / "tickd" / "v1" / "scheduler_pb2.py"
if not _GENERATED.exists() or _GENERATED.stat().st_mtime < _PROTO.stat().st_mtime:
    _generate()
sys.path.insert(0, str(OUT))
pb = importlib.import_module("tickd.v1.scheduler_pb2")
rpc = importlib.import_module("tickd.v1.scheduler_pb2_grpc")
