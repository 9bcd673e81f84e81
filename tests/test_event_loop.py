"""The event loop tiergate's processes run on (gateway.event_loop): uvloop by
default, asyncio's own on request, a clear error for anything else; gRPC's
asyncio API works on it; `serve` on either loop answers misses and hits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

from gateway import event_loop
from protos import classifier_pb2
from tests.support.processes import TiergateProcess, wait_serving

uvloop = pytest.importorskip("uvloop")  # a dependency on Linux and macOS


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize("value", [None, "", "auto", "UVLOOP"])
def test_uvloop_is_the_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(event_loop.ENV, raising=False)
    else:
        monkeypatch.setenv(event_loop.ENV, value)
    assert event_loop.run(_loop_module()).startswith("uvloop")
    assert event_loop.loop_name() == f"uvloop {uvloop.__version__}"


def test_asyncio_runs_asyncios_own_loop(monkeypatch):
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")
    assert event_loop.loop_name() == "asyncio"


def test_an_unknown_choice_fails_naming_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(event_loop.ENV, "trio")
    with pytest.raises(event_loop.EventLoopChoiceError, match=r"\$TIERGATE_EVENT_LOOP must be one of auto, uvloop, asyncio; got 'trio'"):
        event_loop.run(_loop_module())  # the coroutine is closed, not left unawaited (warnings are errors here)


def test_grpc_aio_unary_and_bidi_stream_work_on_uvloop(monkeypatch):
    # The two call shapes tiergate uses: unary (Classify) and a long bidi
    # stream with many messages both ways (the gateway's stream to the model).
    monkeypatch.delenv(event_loop.ENV, raising=False)

    async def echo(request: bytes, context) -> bytes:
        return request[::-1]

    async def chat(requests, context):
        async for request in requests:
            yield request + b"!"

    async def main() -> tuple[bytes, list[bytes]]:
        handler = grpc.method_handlers_generic_handler("t.T", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        })
        server = grpc.aio.server(handlers=[handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = await channel.unary_unary("/t.T/Echo")(b"abc", timeout=10)
                call = channel.stream_stream("/t.T/Chat")()
                replies = []
                for i in range(200):
                    await call.write(str(i).encode())
                    replies.append(await call.read())
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
                return unary, replies
        finally:
            await server.stop(0)

    unary, replies = event_loop.run(main())
    assert unary == b"cba"
    assert replies == [f"{i}!".encode() for i in range(200)]


@pytest.mark.parametrize("choice", ["asyncio", "auto"])
def test_serve_answers_misses_and_hits_on_either_loop(procs, connect, tmp_path, tiny_model, choice):
    serve = TiergateProcess(["serve", "--port", "0", "--workers", "2", "--model", str(tiny_model),
                             "--lmdb-path", str(tmp_path / "l2")], env={**procs.env, event_loop.ENV: choice})
    procs.started.append(serve)
    serve.start()
    wait_serving(serve.address)
    # Each process logs the loop it runs on, from inside it: serve (worker 0),
    # the other worker, the inference child.
    expected = "asyncio" if choice == "asyncio" else "uvloop"
    announced = [line for line in serve.output if "event loop: " in line]
    assert len(announced) == 3 and all(f"event loop: {expected}" in line for line in announced), announced
    client = connect(serve)
    texts = [f"{choice} text number {i}" for i in range(20)]
    first = [client.classify(t) for t in texts]
    assert {r.tier for r in first} == {classifier_pb2.TIER_MODEL}
    again = [client.classify(t) for t in texts]
    assert {r.tier for r in again} == {classifier_pb2.TIER_L1}
    assert [(r.label, r.score) for r in again] == [(r.label, r.score) for r in first]
    assert serve.stop() == 0


@pytest.mark.parametrize("command", [
    ["inference", "--port", "0"],
    ["serve", "--port", "0"],
    ["gateway", "--port", "0", "--inference", "127.0.0.1:9"],
    ["classify", "-", "--column", "text"],
])
def test_a_bad_choice_stops_the_command_with_a_clear_error(tiny_model, tmp_path, command):
    done = subprocess.run([sys.executable, "-m", "gateway", *command, *(["--model", str(tiny_model)] if command[0] in ("inference", "serve") else [])],
                          input="text\nhello\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TIERGATE_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_OFFLINE": "1", event_loop.ENV: "fast"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"tiergate {command[0]}: error: $TIERGATE_EVENT_LOOP must be one of auto, uvloop, asyncio; got 'fast'"
            in done.stderr), done.stderr
    assert "Traceback" not in done.stderr
