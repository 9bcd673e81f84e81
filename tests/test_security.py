"""TLS, mTLS and bearer tokens (issue 11, items 2-4), on real gRPC servers on port 0.

Certificates are made here with trustme. In-process gateways (GatewayServer
with an in-memory Upstream) cover the handshake and token rules and their
reload; real `tiergate` processes cover the flags, SIGHUP passed on to every
worker, the gateway's TLS+token client towards a TLS+token inference service,
`classify --target`, and the inference service's own limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.server import GatewayConfig, GatewayServer
from protos import classifier_pb2, classifier_pb2_grpc, inference_pb2, inference_pb2_grpc
from protos.security import (
    INVALID_TOKEN, MALFORMED_TOKEN, MISSING_TOKEN, ClientSecurity, ClientTls, TlsFiles, TokenAuth,
)
from tests.helpers import eventually
from tests.support.fake_upstream import FakeUpstream

OK_TOKEN, NEW_TOKEN = "tok-0123456789abcdef", "tok-fedcba9876543210"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(cert: trustme.LeafCert, directory: pathlib.Path, name: str) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    return str(cert_path), str(key_path)


@pytest.fixture
def pki(ca, tmp_path):
    """CA file, server cert+key, client cert+key, all under tmp_path."""
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server = write_cert(ca.issue_cert("127.0.0.1", "localhost", organization_name="first"), tmp_path, "server")
    client = write_cert(ca.issue_cert("gateway-client@example.com"), tmp_path, "client")
    return {"ca": str(ca_path), "server": server, "client": client, "dir": tmp_path}


def tokens_file(path: pathlib.Path, *tokens: str) -> str:
    path.write_text("# bearer tokens\n\n" + "".join(f"{t}\n" for t in tokens))
    return str(path)


class ServedUpstream(FakeUpstream):
    """FakeUpstream with what a GatewayServer asks of its Upstream besides score()."""

    counters: dict[str, int] = {}

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def gateway(**config):
    server = GatewayServer(GatewayConfig(port=0, inference_targets=(), **config), upstream=ServedUpstream())
    await server.start(wait_for_inference=False)
    try:
        yield server
    finally:
        await server.stop(0)


async def classify(address: str, security: ClientSecurity = ClientSecurity(), timeout: float = 5.0,
                   metadata=None) -> classifier_pb2.ClassifyResponse:
    async with security.aio_channel(address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        return await stub.Classify(classifier_pb2.ClassifyRequest(text="hello there"), timeout=timeout,
                                   metadata=metadata if metadata is not None else security.metadata)


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def peer_organization(port: int, ca_path: str) -> str:
    """The organization in the certificate a new TLS connection to the port is shown."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        subject = dict(part[0] for part in writer.get_extra_info("peercert")["subject"])
        return subject["organizationName"]
    finally:
        writer.close()


def test_tls_works_with_the_ca_and_fails_without(pki, tmp_path):
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))

    async def main():
        async with gateway(tls=TlsFiles(*pki["server"])) as server:
            good = ClientSecurity(ClientTls(ca=pki["ca"]))
            assert (await classify(server.address, good)).label in ("negative", "positive")
            assert await code_of(classify(server.address)) == grpc.StatusCode.UNAVAILABLE  # plaintext
            wrong_ca = ClientSecurity(ClientTls(ca=str(tmp_path / "other-ca.pem")))
            assert await code_of(classify(server.address, wrong_ca)) == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_mtls_refuses_a_client_without_a_certificate(pki, tmp_path):
    stranger = trustme.CA()
    unknown = write_cert(stranger.issue_cert("stranger@example.com"), tmp_path, "stranger")

    async def main():
        async with gateway(tls=TlsFiles(*pki["server"], client_ca=pki["ca"])) as server:
            with_cert = ClientSecurity(ClientTls(pki["ca"], *pki["client"]))
            assert (await classify(server.address, with_cert)).label
            no_cert = ClientSecurity(ClientTls(ca=pki["ca"]))
            assert await code_of(classify(server.address, no_cert)) == grpc.StatusCode.UNAVAILABLE
            foreign = ClientSecurity(ClientTls(pki["ca"], *unknown))
            assert await code_of(classify(server.address, foreign)) == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_tokens_guard_every_public_call_but_health_and_reflection_stay_open(tmp_path):
    path = tokens_file(tmp_path / "tokens", OK_TOKEN, "tok-second-one")

    async def main():
        async with gateway(auth_tokens=path) as server:
            address = server.address

            async def refused(metadata) -> str:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await classify(address, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                return info.value.details()

            assert await refused(()) == MISSING_TOKEN
            assert await refused((("authorization", "Bearer not-a-token"),)) == INVALID_TOKEN
            assert await refused((("authorization", f"Basic {OK_TOKEN}"),)) == MALFORMED_TOKEN
            assert (await classify(address, ClientSecurity(token=OK_TOKEN))).label
            assert (await classify(address, metadata=(("authorization", "bearer tok-second-one"),))).label

            async with grpc.aio.insecure_channel(address) as channel:
                admin = classifier_pb2_grpc.GatewayAdminStub(channel)
                assert await code_of(admin.GetStats(classifier_pb2.GetStatsRequest(), timeout=5)) == \
                    grpc.StatusCode.UNAUTHENTICATED
                assert (await admin.GetStats(classifier_pb2.GetStatsRequest(), timeout=5,
                                             metadata=ClientSecurity(token=OK_TOKEN).metadata)).workers == 1
                stream = classifier_pb2_grpc.ClassifierStub(channel).ClassifyStream()
                assert await code_of(stream.read()) == grpc.StatusCode.UNAUTHENTICATED
                junk = channel.unary_unary("/tiergate.v1.Nothing/Here")
                assert await code_of(junk(b"", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
                # Open without a token:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
                await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                listed = await reflect.read()
                await reflect.done_writing()
                names = {s.name for s in listed.list_services_response.service}
                assert "tiergate.v1.Classifier" in names

    asyncio.run(main())


def test_token_rotation_by_reload_keeps_the_old_set_when_the_new_file_is_bad(tmp_path, caplog):
    path = tmp_path / "tokens"
    tokens_file(path, OK_TOKEN)

    async def main():
        async with gateway(auth_tokens=str(path)) as server:
            assert (await classify(server.address, ClientSecurity(token=OK_TOKEN))).label
            path.write_text("# rotated\n")  # no token at all: refused, the old one stays
            server.reload()
            assert "tokens reload failed" in caplog.text
            assert (await classify(server.address, ClientSecurity(token=OK_TOKEN))).label
            tokens_file(path, NEW_TOKEN)
            server.reload()
            assert await code_of(classify(server.address, ClientSecurity(token=OK_TOKEN))) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert (await classify(server.address, ClientSecurity(token=NEW_TOKEN))).label

    asyncio.run(main())
    assert OK_TOKEN not in caplog.text and NEW_TOKEN not in caplog.text


def test_certificate_reload_while_a_client_keeps_calling(ca, pki, caplog):
    cert_path, key_path = pki["server"]

    async def main():
        async with gateway(tls=TlsFiles(cert_path, key_path)) as server:
            security = ClientSecurity(ClientTls(ca=pki["ca"]))
            async with security.aio_channel(server.address) as channel:
                stub = classifier_pb2_grpc.ClassifierStub(channel)
                stop = asyncio.Event()
                answered = 0

                async def keep_calling() -> None:
                    nonlocal answered
                    while not stop.is_set():
                        await stub.Classify(classifier_pb2.ClassifyRequest(text=f"call {answered}"), timeout=5)
                        answered += 1

                caller = asyncio.ensure_future(keep_calling())
                while answered < 20:
                    await asyncio.sleep(0.01)
                assert await peer_organization(server.port, pki["ca"]) == "first"
                # A broken file first: logged, and the old certificate stays.
                pathlib.Path(key_path).write_text("not a key\n")
                server.reload()
                assert "TLS reload failed" in caplog.text
                assert await peer_organization(server.port, pki["ca"]) == "first"
                write_cert(ca.issue_cert("127.0.0.1", "localhost", organization_name="second"), pki["dir"], "server")
                server.reload()
                assert await peer_organization(server.port, pki["ca"]) == "second"
                before = answered
                while answered < before + 20:
                    await asyncio.sleep(0.01)
                stop.set()
                await caller  # raises if any call failed
                assert (await classify(server.address, security)).label  # a new gRPC connection

    asyncio.run(main())
    assert "BEGIN" not in caplog.text  # no PEM in the log


def test_token_auth_compares_against_every_token(tmp_path):
    auth = TokenAuth(tokens_file(tmp_path / "tokens", "aaaa", "bbbb", "cccc"))
    assert auth.valid("cccc") and auth.valid("aaaa")
    assert not auth.valid("aaa") and not auth.valid("") and not auth.valid("aaaab")


# --- through real processes ----------------------------------------------------------------------------------------


def sync_peer_organization(port: int, ca_path: str) -> str:
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            return dict(part[0] for part in tls.getpeercert()["subject"])["organizationName"]


def test_tls_and_tokens_through_real_processes_rotated_by_sighup(procs, ca, pki, tmp_path, tiny_model):
    """inference (TLS+tokens) <- gateway with 2 workers (TLS+tokens, client TLS+token) <- clients;
    SIGHUP to the gateway rotates its certificate and tokens in every worker."""
    cert, key = pki["server"]
    inference_tokens = tokens_file(tmp_path / "inference-tokens", "inference-secret")
    inference = procs.inference(tiny_model, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki["ca"],
                                "--auth-tokens", inference_tokens)
    gateway_tokens = tmp_path / "gateway-tokens"
    tokens_file(gateway_tokens, OK_TOKEN)
    client_cert, client_key = pki["client"]
    gateway = procs.gateway(inference, None, None, "--tls-cert", cert, "--tls-key", key,
                            "--auth-tokens", str(gateway_tokens),
                            "--inference-tls-ca", pki["ca"], "--inference-tls-client-cert", client_cert,
                            "--inference-tls-client-key", client_key, "--inference-token-file", inference_tokens,
                            workers=2)
    tls = ClientTls(ca=pki["ca"])

    def call(token: str) -> grpc.StatusCode:
        # A new connection each time: SO_REUSEPORT may hand it to either worker.
        security = ClientSecurity(tls, token)
        with security.channel(gateway.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                classifier_pb2_grpc.ClassifierStub(channel).Classify(
                    classifier_pb2.ClassifyRequest(text="rotate me"), timeout=10, metadata=security.metadata)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert {call(OK_TOKEN) for _ in range(8)} == {grpc.StatusCode.OK}  # a miss: scored through TLS + token
    assert {call(NEW_TOKEN) for _ in range(8)} == {grpc.StatusCode.UNAUTHENTICATED}
    assert {sync_peer_organization(gateway.port, pki["ca"]) for _ in range(8)} == {"first"}
    kept = ClientSecurity(tls, OK_TOKEN).channel(gateway.address)  # opened before the rotation
    kept_stub = classifier_pb2_grpc.ClassifierStub(kept)
    kept_stub.Classify(classifier_pb2.ClassifyRequest(text="kept"), timeout=10,
                       metadata=ClientSecurity(token=OK_TOKEN).metadata)

    tokens_file(gateway_tokens, NEW_TOKEN)
    write_cert(ca.issue_cert("127.0.0.1", "localhost", organization_name="second"), pki["dir"], "server")
    gateway.signal(signal.SIGHUP)

    def reloaded() -> bool:  # by worker 0 and the other one
        log = "".join(gateway.output)
        return log.count("bearer tokens reloaded") == 2 and log.count("TLS certificate reloaded") == 2

    eventually(reloaded, timeout_s=10)
    assert {call(OK_TOKEN) for _ in range(8)} == {grpc.StatusCode.UNAUTHENTICATED}
    assert {call(NEW_TOKEN) for _ in range(8)} == {grpc.StatusCode.OK}
    assert {sync_peer_organization(gateway.port, pki["ca"]) for _ in range(8)} == {"second"}
    # The connection made before still works (with a token that is valid now).
    kept_stub.Classify(classifier_pb2.ClassifyRequest(text="kept"), timeout=10,
                       metadata=ClientSecurity(token=NEW_TOKEN).metadata)
    kept.close()
    log = "".join(gateway.output)
    assert OK_TOKEN not in log and NEW_TOKEN not in log and "inference-secret" not in log

    # classify --target with the CA and the token from the environment
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nfine day\nbad day\n")
    env = {**os.environ, **procs.env, "TIERGATE_AUTH_TOKEN": NEW_TOKEN}
    done = subprocess.run([sys.executable, "-m", "gateway", "classify", str(rows), "--column", "text", "--target",
                           gateway.address, "--tls-ca", pki["ca"], "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "classified 2 rows" in done.stderr
    assert gateway.stop() == 0


def _score(address: str, security: ClientSecurity, messages: list[list[str]]) -> list[list[tuple[int, str]]]:
    """Sends the messages on one Score stream, each once the previous one is
    answered; (code, message) of every item, per message."""
    got: dict[int, tuple[int, str]] = {}
    answered = threading.Condition()
    firsts = [1 + sum(map(len, messages[:k])) for k in range(len(messages))]

    def requests():
        for first, texts in zip(firsts, messages):
            yield inference_pb2.ScoreRequest(
                items=[inference_pb2.ScoreItem(id=first + k, text=t) for k, t in enumerate(texts)])
            with answered:
                assert answered.wait_for(lambda: all(first + k in got for k in range(len(texts))), timeout=30)

    with security.channel(address) as channel:
        for response in inference_pb2_grpc.InferenceStub(channel).Score(requests(), timeout=30,
                                                                         metadata=security.metadata):
            with answered:
                got.update({r.id: (r.code, r.message) for r in response.results})
                answered.notify_all()
    return [[got[first + k] for k in range(len(texts))] for first, texts in zip(firsts, messages)]


def test_the_inference_service_enforces_its_own_limits_and_token(procs, pki, tmp_path, tiny_model):
    cert, key = pki["server"]
    token_path = tokens_file(tmp_path / "tokens", "inference-secret")
    inference = procs.inference(tiny_model, "--tls-cert", cert, "--tls-key", key, "--auth-tokens", token_path,
                                "--max-text-bytes", "64")
    tls = ClientTls(ca=pki["ca"])
    with ClientSecurity(tls).channel(inference.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Describe(inference_pb2.DescribeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    security = ClientSecurity(tls, "inference-secret")
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    long_text, short = "x" * 65, "a short one"
    too_many = ["t"] * 1025  # over the default --max-message-texts 1024
    first, second, third = _score(inference.address, security, [[short, long_text], too_many, [short]])
    assert first[0][0] == 0
    assert first[1][0] == invalid and "inference --max-text-bytes" in first[1][1]
    assert {code for code, _ in second} == {invalid}
    assert "carries 1025 texts" in second[0][1]
    assert third[0][0] == 0  # the stream went on after both


def test_bad_security_flags_fail_at_start_with_a_message(tmp_path, pki):
    cert, key = pki["server"]
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nothing yet\n")
    cases = {
        "cert without key": (["gateway", "--tls-cert", cert], "--tls-key"),
        "unreadable cert": (["gateway", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", key],
                            "cannot read the TLS certificate"),
        "key of another cert": (["gateway", "--tls-cert", cert, "--tls-key", pki["client"][1]],
                                "do not load as a PEM certificate chain"),
        "empty tokens file": (["gateway", "--auth-tokens", str(empty)], "holds no token"),
        "inference TLS on a Unix socket": (["inference", "--uds", str(tmp_path / "s.sock"), "--tls-cert", cert,
                                            "--tls-key", key], "TLS is for TCP"),
        "classify --tls-ca without --target": (["classify", "in.csv", "--column", "t", "--tls-ca", pki["ca"]],
                                               "only apply with --target"),
    }
    env = {**os.environ, "TIERGATE_CACHE_DIR": str(tmp_path / "cache")}
    runs = {name: subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--port", "0"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, (argv, _) in cases.items()}
    for name, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 1, (name, out, err)
        assert cases[name][1] in err, (name, err)
        assert "Traceback" not in err, (name, err)


def test_bench_load_generators_speak_tls_and_tokens_without_argv_secrets(pki, tmp_path, monkeypatch):
    from gateway.bench.loadgen import Ghz, Grpcload, LoadSpec, PythonLoad, _ghz_security
    from gateway.bench.pyload import Load

    security = ClientSecurity(ClientTls(ca=pki["ca"]), OK_TOKEN)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    spec = LoadSpec(method="/tiergate.v1.Classifier/Classify", texts_file=texts, concurrency=2, connections=1,
                    duration_s=None, requests=20)
    ghz_argv = _ghz_security(security, str(tmp_path))
    assert "--insecure" not in ghz_argv and ghz_argv[:2] == ["--cacert", pki["ca"]]
    metadata = pathlib.Path(ghz_argv[ghz_argv.index("--metadata-file") + 1])
    assert metadata.stat().st_mode & 0o077 == 0 and OK_TOKEN in metadata.read_text()
    python_argv = PythonLoad(sys.executable).argv(spec, "127.0.0.1:1", tmp_path, security)
    assert OK_TOKEN not in " ".join(python_argv) and "-tls" in python_argv
    assert not Grpcload("grpcload").speaks_tls() and Ghz("ghz").speaks_tls()

    # The Python generator against a TLS + token gateway (in this process; its token from the environment).
    monkeypatch.setenv("TIERGATE_AUTH_TOKEN", OK_TOKEN)

    async def main():
        async with gateway(tls=TlsFiles(*pki["server"]), auth_tokens=tokens_file(tmp_path / "tokens", OK_TOKEN)) \
                as server:
            import argparse

            args = argparse.Namespace(addr=server.address, call=spec.method, texts=str(texts), batch=1, unique=False,
                                      c=2, connections=1, n=20, z="", rps=0.0, stream=False, timeout=5.0, tls=True,
                                      cacert=pki["ca"], cert=None, key=None)
            return await Load(args).run()

    result = asyncio.run(main())
    assert result["ok"] == 20 and result["errors"] == {}


def test_the_gateway_checks_the_normalized_text_against_the_limit_the_model_checks_too():
    from gateway.classifier import Classifier, Limits
    from protos.errors import InvalidInput

    core = Classifier(None, None, Limits(max_text_bytes=100))
    assert core.normalize("é" * 50) == "é" * 50  # 100 bytes, NFC already
    with pytest.raises(InvalidInput, match="once normalized"):
        core.normalize("\U0001D160" * 20)  # 80 bytes as sent, 240 once normalized (NFC)


def test_a_client_security_never_shows_its_token():
    security = ClientSecurity(ClientTls(ca="ca.pem"), OK_TOKEN)
    assert OK_TOKEN not in repr(security) and OK_TOKEN not in str(GatewayConfig(inference_security=security))
