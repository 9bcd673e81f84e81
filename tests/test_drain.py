"""Shutdown drains (issue 9, item 13): on SIGTERM health says NOT_SERVING at
once, calls are still served for --drain-s, calls in flight finish within
--grace-s, later calls get UNAVAILABLE (never a bare CANCELLED), and the
process exits 0. The same for the inference service and for `serve`.

A miss is held in flight by the model's batch window (--max-wait-ms 1000:
a lone new text waits that long for company), and past the drain period by
freezing the inference service (SIGSTOP) once the text is queued there, until
the gateway refuses new calls (SIGCONT then lets it answer).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.gate import SHUTTING_DOWN, ClosingGate
from protos import classifier_pb2
from tests.helpers import eventually, inference_counters

MODEL, L1 = classifier_pb2.TIER_MODEL, classifier_pb2.TIER_L1
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CACHED = [f"cached before the signal {i}" for i in range(4)]  # 4 texts: a full batch, scored without waiting
HOLD_MS = "1000"   # a lone new text waits this long for company in its batch
SLACK_S = 15       # on top of drain + grace, for the processes' own start-up and exit


def health(address: str, service: str = "") -> int:
    # A new channel each time: with several workers it may reach any of them.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def queued(inference_address: str) -> bool:
    return inference_counters(inference_address).get("queue_depth", 0) >= 1


def refused(client, text: str) -> grpc.RpcError | None:
    """The error a call gets, or None while it is still answered."""
    try:
        client.classify(text, timeout=5)
    except grpc.RpcError as exc:
        return exc
    return None


def test_sigterm_drains_the_gateway_workers_then_refuses_and_exits_0(procs, connect, tmp_path, tiny_model):
    inference = procs.inference(tiny_model, "--max-wait-ms", HOLD_MS)
    gateway = procs.gateway(inference, tmp_path / "l2", None, "--drain-s", "3", "--grace-s", "30", workers=2)
    client = connect(gateway)
    assert {r.tier for r in client.batch(CACHED)} == {MODEL}
    assert health(gateway.address) == SERVING

    in_flight = client.stub.Classify.future(classifier_pb2.ClassifyRequest(text="in flight at the signal"), timeout=60)
    eventually(lambda: queued(inference.address))
    inference.signal(signal.SIGSTOP)  # the text stays in flight until SIGCONT
    gateway.terminate()

    # Every worker says NOT_SERVING, for the whole server and for the service by name...
    eventually(lambda: all(health(gateway.address, s) == NOT_SERVING
                           for s in ("", "tiergate.v1.Classifier") for _ in range(4)), timeout_s=5)
    # ...while calls are still answered as usual during the drain period.
    assert client.classify(CACHED[0]).tier == L1

    # After the drain: new calls are refused with UNAVAILABLE, the call in flight still gets its answer.
    error = eventually(lambda: refused(client, CACHED[1]), timeout_s=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert SHUTTING_DOWN in error.details() or "connect" in error.details().lower(), error.details()
    assert not in_flight.done()
    inference.signal(signal.SIGCONT)
    answer = in_flight.result(timeout=60)
    assert answer.tier == MODEL and answer.label in ("negative", "positive")
    assert gateway.wait(timeout=3 + 30 + SLACK_S) == 0


def test_a_second_signal_ends_the_drain_period_at_once(procs, connect, tmp_path, tiny_model):
    gateway = procs.gateway(procs.inference(tiny_model), None, None, "--drain-s", "600")
    gateway.terminate()
    eventually(lambda: health(gateway.address) == NOT_SERVING, timeout_s=5)
    assert connect(gateway).classify("served during the drain").tier == MODEL
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(timeout=60) == 0  # far less than the 600 s drain


def test_the_inference_service_drains_answers_what_it_holds_and_exits_0(procs, connect, tmp_path, tiny_model):
    inference = procs.inference(tiny_model, "--max-wait-ms", HOLD_MS, "--drain-s", "3", "--grace-s", "30")
    client = connect(procs.gateway(inference, tmp_path / "l2"))
    assert {r.tier for r in client.batch(CACHED)} == {MODEL}

    in_flight = client.stub.Classify.future(classifier_pb2.ClassifyRequest(text="queued at the signal"), timeout=60)
    eventually(lambda: queued(inference.address))
    inference.terminate()
    eventually(lambda: all(health(inference.address, s) == NOT_SERVING for s in ("", "tiergate.inference.v1.Inference")),
               timeout_s=5)

    # Texts are still scored during the drain.
    assert client.classify("new during the inference's drain", timeout=30).tier == MODEL
    answer = in_flight.result(timeout=60)
    assert answer.tier == MODEL
    assert inference.wait(timeout=3 + 30 + SLACK_S) == 0
    # Without it, the gateway still serves what it holds and says why it cannot score new texts.
    assert client.classify(CACHED[0]).tier == L1
    error = refused(client, "new after the inference service stopped")
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error


def test_serve_answers_a_miss_in_flight_at_sigterm_then_stops_every_process(procs, connect, tmp_path, tiny_model):
    from tests.test_cli import alive, children_of

    serve = procs.start("serve", "--port", "0", "--workers", "1", "--model", str(tiny_model), "--lmdb-path",
                        str(tmp_path / "l2"), "--max-wait-ms", HOLD_MS, "--drain-s", "0.5", "--grace-s", "30")
    kids = children_of(serve.proc.pid)
    # serve logs which inference child its gateway connected to.
    found = eventually(lambda: re.search(r"connected to inference service (\S+)", "".join(serve.output)))
    client = connect(serve)
    assert {r.tier for r in client.batch(CACHED)} == {MODEL}

    (model,) = [kid for kid in kids if b" inference " in pathlib.Path(f"/proc/{kid}/cmdline").read_bytes().replace(
        b"\0", b" ")]
    in_flight = client.stub.Classify.future(classifier_pb2.ClassifyRequest(text="a miss at sigterm"), timeout=60)
    eventually(lambda: queued(found.group(1)))
    os.kill(model, signal.SIGSTOP)
    serve.terminate()

    # The gateway drains, then refuses new calls; the inference child still runs, holding the miss.
    error = eventually(lambda: refused(client, CACHED[0]), timeout_s=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert alive(model) and not in_flight.done()
    os.kill(model, signal.SIGCONT)
    answer = in_flight.result(timeout=60)
    assert answer.tier == MODEL
    assert serve.wait(timeout=0.5 + 30 + 30 + SLACK_S) == 0
    for kid in kids:
        eventually(lambda: not alive(kid), timeout_s=15)


def test_a_closed_gate_refuses_every_call_but_health_with_a_message():
    from grpc_health.v1._async import HealthServicer

    async def answer(request, context):
        return b""

    async def run() -> None:
        gate = ClosingGate()
        server = grpc.aio.server()
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_generic_rpc_handlers([gate, grpc.method_handlers_generic_handler("tiergate.v1.Classifier", {
            "Classify": grpc.unary_unary_rpc_method_handler(answer),
            "ClassifyStream": grpc.stream_stream_rpc_method_handler(answer)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = channel.unary_unary("/tiergate.v1.Classifier/Classify")
                assert await unary(b"", timeout=5) == b""
                gate.close()
                for call in (unary(b"", timeout=5), channel.stream_stream("/tiergate.v1.Classifier/ClassifyStream")(
                        timeout=5)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        if hasattr(call, "read"):
                            await call.read()
                        else:
                            await call
                    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                await health_servicer.set("", NOT_SERVING)
                check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == NOT_SERVING
        finally:
            await server.stop(0)

    asyncio.run(run())


def test_after_the_drain_a_score_stream_answers_what_it_holds_reads_nothing_more_and_ends_unavailable():
    from types import SimpleNamespace

    from inference.service import SHUTTING_DOWN as INFERENCE_SHUTTING_DOWN
    from inference.service import InferenceServicer
    from protos import inference_pb2, inference_pb2_grpc

    class HeldBatcher:
        """Every text waits until the test scores it."""

        depth = 0
        counters: dict = {}

        def __init__(self) -> None:
            self.held: dict[str, asyncio.Future] = {}

        def submit(self, text, timeout):
            self.held[text] = asyncio.get_running_loop().create_future()
            return self.held[text]

    async def run() -> None:
        info = SimpleNamespace(model_id="m", labels=("negative", "positive"), fingerprint="f", device="cpu",
                               dtype="float32")
        batcher = HeldBatcher()
        servicer = InferenceServicer(SimpleNamespace(info=info), batcher)
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = inference_pb2_grpc.InferenceStub(channel).Score(timeout=10)
                await stream.write(inference_pb2.ScoreRequest(items=[inference_pb2.ScoreItem(id=1, text="held")]))
                while "held" not in batcher.held:
                    await asyncio.sleep(0.01)
                servicer.close_intake()
                await stream.write(inference_pb2.ScoreRequest(items=[inference_pb2.ScoreItem(id=2, text="late")]))
                batcher.held["held"].set_result(("positive", 0.75))
                reply = await stream.read()
                assert [(r.id, r.label) for r in reply.results] == [(1, "positive")]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream.read()
                assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                                    INFERENCE_SHUTTING_DOWN)
                assert "late" not in batcher.held  # never read: the gateway sends it elsewhere
                # New streams are refused the same way.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await inference_pb2_grpc.InferenceStub(channel).Score(iter([]), timeout=10).read()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(run())
