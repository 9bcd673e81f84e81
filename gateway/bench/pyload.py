"""The built-in load generator: grpc.aio, the same flags and JSON line as grpcload.

    python -m gateway.bench.pyload -addr HOST:PORT -call /pkg.Service/Method -texts FILE [-c 50]
        [-connections 4] [-n N | -z 10s] [-batch K] [-unique] [-stream] [-rps R] [-timeout 20s]
        [-tls [-cacert CA] [-cert CERT -key KEY]]     (a bearer token: $TIERGATE_AUTH_TOKEN)

Beyond grpcload's fields its JSON line has: error_latency_ms (per status code:
p50/p99/max of the failed calls, timed from their actual send, so that "how
fast is a refusal" does not include this generator's own lateness), hung
(calls that hit -timeout, or were still unfinished -timeout + 10 s after the
last send), sent, sent_per_s (calls started per second of the sending window:
with -rps, how close the offered load came to the asked one) and send_lag_ms
(actual send minus scheduled send).

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
import os
import time

import grpc

from gateway.bench.config import parse_duration
from protos.security import ClientSecurity, ClientTls

__all__ = ["main", "percentiles"]

HUNG_GRACE_S = 10.0  # after the last send + the call timeout, whatever is still running counts as hung


def percentiles(values: list[float], points=(("p50", 0.50), ("p99", 0.99), ("max", 1.0))) -> dict[str, float]:
    """Seconds in, milliseconds out (rounded to microseconds): {"p50": .., "p99": .., "max": ..}."""
    vals = sorted(values)
    if not vals:
        return {}
    return {name: round(vals[int(p * (len(vals) - 1))] * 1000, 3) for name, p in points}


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
        tls = ClientTls(args.cacert, args.cert, args.key) if args.tls else None
        self.security = ClientSecurity(tls, os.environ.get("TIERGATE_AUTH_TOKEN") or None)
        self.metadata = self.security.metadata
        with open(args.texts, encoding="utf-8") as fh:
            self.texts = [line.rstrip("\n") for line in fh if line.rstrip("\n")]
        if not self.texts:
            raise SystemExit("pyload: no texts")
        self.next = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_latencies: dict[str, list[float]] = {}
        self.send_lags: list[float] = []
        self.sent = 0
        self.inflight = 0
        self.last_send = 0.0
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

    def error(self, exc: BaseException, sent_at: float | None = None) -> None:
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        self.errors[code] = self.errors.get(code, 0) + 1
        if sent_at is not None:
            self.error_latencies.setdefault(code, []).append(time.perf_counter() - sent_at)

    def sending(self, at: float) -> float:
        now = time.perf_counter()
        self.sent += 1
        self.last_send = now
        self.send_lags.append(max(0.0, now - at))
        return now

    async def unary_worker(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(self.args.call)  # no serializers: bytes in, bytes out
        while (job := await self.take()) is not None:
            i, at = job
            request = self.build(i)
            sent_at = self.sending(at)
            self.inflight += 1
            try:
                await call(request, timeout=self.args.timeout, metadata=self.metadata)
            except Exception as exc:
                self.error(exc, sent_at)
            else:
                self.latencies.append(time.perf_counter() - at)
            finally:
                self.inflight -= 1

    async def stream_worker(self, channel: grpc.aio.Channel) -> None:
        stream = channel.stream_stream(self.args.call)(metadata=self.metadata)
        try:
            while (job := await self.take()) is not None:
                i, at = job
                request = self.build(i)
                self.sending(at)
                await stream.write(request)
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
        channels = [self.security.aio_channel(args.addr, options=[("grpc.use_local_subchannel_pool", 1),
                                                                  ("grpc.max_receive_message_length", 64 << 20)])
                    for _ in range(args.connections)]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)
        worker = self.stream_worker if args.stream else self.unary_worker
        self.start = self.last_send = time.perf_counter()
        if args.z:
            self.deadline = self.start + parse_duration(args.z)
        tasks = [asyncio.create_task(worker(channels[w % len(channels)])) for w in range(args.c)]
        unfinished = await self.wait_all(tasks)
        seconds = time.perf_counter() - self.start
        for ch in channels:
            await ch.close()
        pct = percentiles(self.latencies, (("p50_ms", 0.50), ("p90_ms", 0.90), ("p95_ms", 0.95),
                                           ("p99_ms", 0.99), ("max_ms", 1.0)))
        ok = len(self.latencies)
        window = (self.deadline - self.start) if self.deadline is not None else (self.last_send - self.start)
        hung = self.errors.get("DEADLINE_EXCEEDED", 0) + unfinished
        return {"call": args.call, "ok": ok, "error_count": sum(self.errors.values()), "errors": self.errors,
                "seconds": seconds, "rps": ok / seconds, "texts_per_s": ok * args.batch / seconds,
                **{k: pct.get(k, 0.0) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")},
                "c": args.c, "connections": args.connections, "batch": args.batch,
                "offered_rps": args.rps, "stream": args.stream, "timeout_s": args.timeout,
                "error_latency_ms": {code: percentiles(v) for code, v in sorted(self.error_latencies.items())},
                "hung": hung, "unfinished": unfinished, "sent": self.sent,
                "sent_per_s": self.sent / window if window > 0 else None, "send_lag_ms": percentiles(self.send_lags)}

    async def wait_all(self, tasks: list[asyncio.Task]) -> int:
        """Waits for every worker; a call still running -timeout + HUNG_GRACE_S
        after the last send is cancelled and counted (returns how many)."""
        pending = set(tasks)
        while pending:
            if self.deadline is not None and time.perf_counter() < self.deadline:
                limit = self.deadline - time.perf_counter() + self.args.timeout + HUNG_GRACE_S
            else:
                limit = max(0.0, self.last_send + self.args.timeout + HUNG_GRACE_S - time.perf_counter())
            _, pending = await asyncio.wait(pending, timeout=limit)
            if pending and (self.deadline is None or time.perf_counter() >= self.deadline) and \
                    time.perf_counter() >= self.last_send + self.args.timeout + HUNG_GRACE_S:
                unfinished = self.inflight
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return unfinished
        return 0


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
    p.add_argument("-timeout", type=parse_duration, default=20.0, help="per-call deadline, e.g. 20s or 500ms")
    p.add_argument("-tls", action="store_true", help="TLS (trusting -cacert, else the system's CAs)")
    p.add_argument("-cacert")
    p.add_argument("-cert")
    p.add_argument("-key")
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(Load(args).run())), flush=True)


if __name__ == "__main__":
    main()
