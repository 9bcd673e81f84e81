"""The `tiergate` commands as a user runs them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import classifier_pb2
from tests.helpers import children_of, eventually
from tests.support.processes import wait_serving


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_runs_the_stack_and_sigterm_stops_every_process(procs, connect, tmp_path, tiny_model):
    serve = procs.start("serve", "--port", "0", "--workers", "1", "--model", str(tiny_model),
                        "--lmdb-path", str(tmp_path / "l2"))
    assert "L3 off" in serve.ready_line
    wait_serving(serve.address)
    client = connect(serve)
    assert client.classify("served by tiergate serve").tier == classifier_pb2.TIER_MODEL
    assert client.classify("served by tiergate serve").tier == classifier_pb2.TIER_L1
    kids = children_of(serve.proc.pid)
    assert kids, "serve should run the inference service as a child process"
    inference = [k for k in kids if b"inference" in pathlib.Path(f"/proc/{k}/cmdline").read_bytes()]
    assert len(inference) == 1
    # It listens on a Unix socket in a 0700 directory of its own, and on no TCP port.
    argv = pathlib.Path(f"/proc/{inference[0]}/cmdline").read_bytes().split(b"\0")
    socket_dir = pathlib.Path(argv[argv.index(b"--uds") + 1].decode()).parent
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    assert listening_tcp_ports(inference[0]) == []

    assert serve.stop() == 0
    for kid in kids:
        eventually(lambda: not alive(kid), timeout_s=15)
    assert not socket_dir.exists()


def listening_tcp_ports(pid: int) -> list[int]:
    """The TCP ports a process listens on (its socket fds matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_reflection_lists_the_public_service(procs, tmp_path, tiny_model):
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
        assert {"tiergate.v1.Classifier", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="tiergate.v1.Classifier")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_reflection_resolves_methods_fields_and_enum_values(procs, tmp_path, tiny_model):
    # What ghz and grpcurl ask for when called with --call/describe and no .proto.
    from google.protobuf import descriptor_pb2

    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2")
    symbols = ["tiergate.v1.Classifier", "tiergate.v1.Classifier.Classify", "tiergate.v1.Classifier.ClassifyBatch",
               "tiergate.v1.Classifier.ClassifyStream", "tiergate.v1.GatewayAdmin.GetStats",
               "tiergate.v1.ClassifyRequest", "tiergate.v1.ClassifyRequest.text", "tiergate.v1.Tier",
               "tiergate.v1.Tier.TIER_L1", "tiergate.v1.TIER_L1", "grpc.health.v1.Health.Check"]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
        requests.append(reflection_pb2.ServerReflectionRequest(file_containing_symbol="tiergate.v1.Classifier.Nope"))
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    for symbol, reply in zip(symbols, replies):
        assert reply.WhichOneof("message_response") == "file_descriptor_response", symbol
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in reply.file_descriptor_response.file_descriptor_proto]
        assert any(symbol.split(".")[-1] in str(f) for f in files), symbol
    assert replies[-1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_importing_the_gateway_does_not_import_torch():
    code = (
        "import sys, gateway.cli, gateway.server, gateway.servicer, gateway.classify, gateway.classify.embedded, gateway.stack, cache;"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_lists_every_command():
    done = run_cli("--help")
    for command in ("serve", "gateway", "inference", "classify", "model"):
        assert command in done.stdout
