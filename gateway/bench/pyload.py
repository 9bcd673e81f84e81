"""The built-in load generator: grpc.aio, the same flags and JSON line as grpcload.

    python -m gateway.bench.pyload -addr HOST:PORT -call /pkg.Service/Method -texts FILE [-c 50]
        [-connections 4] [-n N | -z 10s] [-batch K] [-unique] [-stream] [-rps R]

Used when neither ghz nor grpcload is installed. It runs on the same cores as
the server it measures and Python's per-call cost is close to the server's
own, so its numbers say as much about itself as about the server: prefer
grpcload or ghz for anything quoted.

Requests are raw protobuf bytes built by hand (field 1, length-delimited), as
grpcload does, so no generated code and no parsing sits in the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

from gateway.bench.config import parse_duration

__all__ = ["main"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field1(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"\x0a" + _varint(len(data)) + data


class Load:
    def __init__(self, args) -> None:
        self.args = args
        with open(args.texts, encoding="utf-8") as fh:
            self.texts = [line.rstrip("\n") for line in fh if line.rstrip("\n")]
        if not self.texts:
            raise SystemExit("pyload: no texts")
        self.next = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.start = 0.0
        self.deadline: float | None = None

    def build(self, i: int) -> bytes:
        parts = []
        for k in range(self.args.batch):
            j = i * self.args.batch + k
            text = self.texts[j % len(self.texts)]
            parts.append(field1(f"{text} #{j}" if self.args.unique else text))
        return b"".join(parts)

    async def take(self) -> tuple[int, float] | None:
        """The next request number and the time it counts from (grpcload's take())."""
        i = self.next
        self.next += 1
        if self.deadline is None and i >= self.args.n:
            return None
        if self.args.rps:
            at = self.start + i / self.args.rps
            if self.deadline is not None and at > self.deadline:
                return None
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return i, at
        now = time.perf_counter()
        if self.deadline is not None and now > self.deadline:
            return None
        return i, now

    def error(self, exc: BaseException) -> None:
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        self.errors[code] = self.errors.get(code, 0) + 1

    async def unary_worker(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(self.args.call)  # no serializers: bytes in, bytes out
        while (job := await self.take()) is not None:
            i, at = job
            try:
                await call(self.build(i), timeout=self.args.timeout)
            except Exception as exc:
                self.error(exc)
            else:
                self.latencies.append(time.perf_counter() - at)

    async def stream_worker(self, channel: grpc.aio.Channel) -> None:
        stream = channel.stream_stream(self.args.call)()
        try:
            while (job := await self.take()) is not None:
                i, at = job
                await stream.write(self.build(i))
                await stream.read()
                self.latencies.append(time.perf_counter() - at)
            await stream.done_writing()
        except Exception as exc:
            self.error(exc)
        finally:
            stream.cancel()

    async def run(self) -> dict:
        args = self.args
        # A local subchannel pool per channel: otherwise channels to one target share one TCP connection.
        channels = [grpc.aio.insecure_channel(args.addr, options=[("grpc.use_local_subchannel_pool", 1),
                                                                  ("grpc.max_receive_message_length", 64 << 20)])
                    for _ in range(args.connections)]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)
        worker = self.stream_worker if args.stream else self.unary_worker
        self.start = time.perf_counter()
        if args.z:
            self.deadline = self.start + parse_duration(args.z)
        await asyncio.gather(*(worker(channels[w % len(channels)]) for w in range(args.c)))
        seconds = time.perf_counter() - self.start
        for ch in channels:
            await ch.close()
        lats = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lats[int(p * (len(lats) - 1))] * 1000, 3) if lats else 0.0

        return {"call": args.call, "ok": len(lats), "error_count": sum(self.errors.values()), "errors": self.errors,
                "seconds": seconds, "rps": len(lats) / seconds, "texts_per_s": len(lats) * args.batch / seconds,
                "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
                "max_ms": pct(1.0), "c": args.c, "connections": args.connections, "batch": args.batch,
                "offered_rps": args.rps, "stream": args.stream}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.pyload", description=__doc__.split("\n")[0])
    p.add_argument("-addr", default="127.0.0.1:50051")
    p.add_argument("-call", required=True)
    p.add_argument("-texts", required=True)
    p.add_argument("-batch", type=int, default=1)
    p.add_argument("-unique", action="store_true")
    p.add_argument("-c", type=int, default=50)
    p.add_argument("-connections", type=int, default=1)
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("-z", default="")
    p.add_argument("-rps", type=float, default=0.0)
    p.add_argument("-stream", action="store_true")
    p.add_argument("-timeout", type=float, default=20.0)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(Load(args).run())), flush=True)


if __name__ == "__main__":
    main()
