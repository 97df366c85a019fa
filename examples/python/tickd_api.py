"""Generates the Python code for tickd's API from ../../proto on first import (and again when the
proto changes), and exposes it with `connect`. google.api annotations come from
googleapis-common-protos.

    from tickd_api import connect, pb, rpc   # a client, tickd.v1 messages, the SchedulerStub
"""

import collections
import importlib
import os
import sys
from pathlib import Path

import grpc
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


def connect(addr=None):
    """A SchedulerStub for tickd at `addr` (default: $TICKD_ADDR, else localhost:50051), set up
    from the same environment variables as tickctl:

    TICKD_ADDR             host:port, http://host:port, or https://host:port for TLS
    TICKD_CA_FILE          PEM CA to verify tickd's certificate (default: the public roots)
    TICKD_CLIENT_CERT/KEY  PEM client certificate and key, for mutual TLS
    TICKD_TLS_SERVER_NAME  name the certificate must have, when not the address's host
    TICKD_TOKEN            bearer token, sent as `authorization: Bearer <token>`

    TICKD_CA_FILE or TICKD_CLIENT_CERT imply TLS.
    """
    env = os.environ
    addr = addr or env.get("TICKD_ADDR", "localhost:50051")
    scheme, _, target = addr.rpartition("://")
    tls = scheme == "https" or bool(env.get("TICKD_CA_FILE") or env.get("TICKD_CLIENT_CERT"))
    if tls and scheme == "http":
        raise ValueError(f"TICKD_CA_FILE and TICKD_CLIENT_CERT need TLS; use https://{target}")
    if bool(env.get("TICKD_CLIENT_CERT")) != bool(env.get("TICKD_CLIENT_KEY")):
        raise ValueError("set both TICKD_CLIENT_CERT and TICKD_CLIENT_KEY, or neither")
    token = env.get("TICKD_TOKEN", "").strip()

    if not tls:
        channel = grpc.insecure_channel(target)
        if token:
            # grpc refuses call credentials on a plaintext channel (they would leak the token),
            # so an interceptor adds it: for a server behind a proxy that ends TLS, or tests.
            channel = grpc.intercept_channel(channel, _BearerInterceptor(token))
        return rpc.SchedulerStub(channel)

    def read(name):
        return Path(env[name]).read_bytes() if env.get(name) else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("TICKD_CA_FILE"),
        private_key=read("TICKD_CLIENT_KEY"),
        certificate_chain=read("TICKD_CLIENT_CERT"),
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    options = []
    if env.get("TICKD_TLS_SERVER_NAME"):
        options.append(("grpc.ssl_target_name_override", env["TICKD_TLS_SERVER_NAME"]))
    return rpc.SchedulerStub(grpc.secure_channel(target, credentials, options))


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (tickd has unary and bidi calls)."""

    def __init__(self, token):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)
