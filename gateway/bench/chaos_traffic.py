"""The chaos scenario's clients: what they send and what they got back.

TextSource: Zipf picks over a pool of real texts, a share of texts never sent
before, and repeats in another spelling (extra whitespace) that the gateway
must normalize to the same key. Traffic: asyncio clients, each a paced closed
loop of Classify, ClassifyBatch (2-20 texts) and ClassifyStream (2-10 texts)
with deadlines drawn log-uniformly; every call is bounded by its deadline +
HANG_GRACE_S, so a call the gateway never finishes is counted, not waited for.
Tally: everything that came back (statuses, in-band errors, answers, lost
answers, hung calls, latency per fault window), judged later by chaos_oracle.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import accumulate

import grpc

from cache.keys import normalize_text
from gateway.bench.texts import corpus_texts, generated_texts
from protos import classifier_pb2, classifier_pb2_grpc

__all__ = ["TrafficConfig", "TextSource", "Traffic", "Tally", "ALLOWED", "CODE_NAMES", "HANG_GRACE_S"]

HANG_GRACE_S = 5.0        # a call still running this long after its deadline is hung
# The only errors a fault explains: the target is that nothing else reaches a caller.
ALLOWED = frozenset({"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
RESPELL_SHARE = 0.1       # repeated texts sent in another spelling (extra whitespace) of the same key
PRIME_BATCH = 50
KINDS = ("unary", "batch", "stream")
KIND_WEIGHTS = (2, 1, 1)
EXAMPLES = 10             # examples kept per kind of failure
# Clients reconnect within a second of a restarted gateway (gRPC's default backoff grows to 2 minutes).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000))
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
LOCAL_INTERNAL = "Internal error from Core"  # grpc.aio's details for a write that failed in the client's core
TIER_NAMES = {v: k for k, v in classifier_pb2.Tier.items()}


@dataclass(frozen=True)
class TrafficConfig:
    clients: int = 6
    rate: float = 150.0              # calls/s all clients together start at most (each a paced closed loop)
    connections: int = 4             # channels, spread over the gateway's workers by SO_REUSEPORT
    pool: int = 2000                 # distinct repeated texts
    prime: int = 300                 # the most popular of them, scored before the clock starts (a warm cache)
    zipf_s: float = 1.1
    new_share: float = 0.05          # texts never sent before
    min_deadline_s: float = 0.005
    max_deadline_s: float = 60.0
    seed: int = 20240611

    def __post_init__(self) -> None:
        for name, value in (("clients", self.clients), ("connections", self.connections), ("pool", self.pool)):
            if value < 1:
                raise ValueError(f"chaos {name} must be >= 1, got {value}")
        if not 0 <= self.prime <= self.pool:
            raise ValueError(f"chaos prime must be in 0..pool ({self.pool}), got {self.prime}")
        if not self.rate > 0:
            raise ValueError(f"chaos rate must be > 0 calls/s, got {self.rate}")
        if not 0 <= self.new_share <= 1:
            raise ValueError(f"chaos new_share must be in 0..1, got {self.new_share}")
        if not self.zipf_s > 0:
            raise ValueError(f"chaos zipf_s must be > 0, got {self.zipf_s}")
        if not 0 < self.min_deadline_s <= self.max_deadline_s:
            raise ValueError(f"chaos deadlines need 0 < min <= max, got {self.min_deadline_s}, {self.max_deadline_s}")


class TextSource:
    """What the clients send: Zipf picks over a pool, a share of new texts, respellings."""

    def __init__(self, cfg: TrafficConfig, tag: str) -> None:
        texts, _ = corpus_texts()
        if len(texts) < cfg.pool:
            texts += generated_texts(cfg.pool - len(texts), cfg.seed)
        random.Random(cfg.seed).shuffle(texts)
        self.pool = texts[:cfg.pool]
        self.cum = list(accumulate(k ** -cfg.zipf_s for k in range(1, len(self.pool) + 1)))
        self.new_share, self.tag = cfg.new_share, tag
        self._new = itertools.count()

    def pick(self, rng: random.Random) -> str:
        if rng.random() < self.new_share:
            return self.fresh(rng)
        text = rng.choices(self.pool, cum_weights=self.cum)[0]
        if rng.random() < RESPELL_SHARE:
            text = " " + text.replace(" ", " \t ", 1) + "  "  # the same key once normalized
        return text

    def fresh(self, rng: random.Random) -> str:
        return f"{rng.choice(self.pool)} #{self.tag}-{next(self._new)}"


class Traffic:
    """Calls the gateway and hands every outcome to the Tally."""

    def __init__(self, cfg: TrafficConfig, address: str, tally: Tally, texts: TextSource) -> None:
        self.cfg, self.tally, self.texts = cfg, tally, texts
        self.phase = "before"  # the fault window a call starts in (set by the schedule)
        self.channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                         for _ in range(cfg.connections)]
        self.stubs = [classifier_pb2_grpc.ClassifierStub(ch) for ch in self.channels]
        self.stop = asyncio.Event()

    def deadline(self, rng: random.Random) -> float:
        lo, hi = math.log(self.cfg.min_deadline_s), math.log(self.cfg.max_deadline_s)
        return math.exp(rng.uniform(lo, hi))

    async def call(self, stub, kind: str, texts: list[str], deadline_s: float) -> int:
        """One call, bounded by deadline + HANG_GRACE_S; returns how many texts got an answer."""
        phase, got = self.phase, []
        t0 = time.monotonic()
        try:
            code, details = await asyncio.wait_for(self._invoke(stub, kind, texts, deadline_s, got),
                                                   deadline_s + HANG_GRACE_S)
        except TimeoutError:
            self.tally.hung(phase, kind, len(texts), deadline_s, len(got))
            return 0
        except Exception as exc:  # noqa: BLE001 - shown as a status no server sends, so it cannot pass unseen
            code, details = "CHAOS_CLIENT_ERROR", repr(exc)
        return self.tally.record(phase, kind, texts, got, code, details, time.monotonic() - t0, deadline_s)

    @staticmethod
    async def _invoke(stub, kind: str, texts: list[str], deadline_s: float, got: list) -> tuple[str, str]:
        start, write_failed = time.monotonic(), False
        if kind == "unary":
            call = stub.Classify(classifier_pb2.ClassifyRequest(text=texts[0]), timeout=deadline_s)
        elif kind == "batch":
            call = stub.ClassifyBatch(classifier_pb2.ClassifyBatchRequest(texts=texts), timeout=deadline_s)
        else:
            call = stub.ClassifyStream(timeout=deadline_s)
        try:
            if kind == "stream":
                try:
                    for text in texts:
                        await call.write(classifier_pb2.ClassifyRequest(text=text))
                    await call.done_writing()
                except Exception:  # noqa: BLE001 - grpc.aio raises AioRpcError or its internal errors
                    write_failed = True  # writing to a stream that already ended; what it answered is read below
                async for response in call:  # partial answers count even if the stream then fails
                    got.append(response)
            else:
                response = await call
                got.extend([response] if kind == "unary" else response.results)
        except grpc.aio.AioRpcError:
            pass  # the call's status below says what happened
        finally:
            if not call.done():
                call.cancel()  # hung: wait_for cancelled us
        code, details = (await call.code()).name, await call.details() or ""
        if write_failed and code == "INTERNAL" and details == LOCAL_INTERNAL and time.monotonic() - start >= deadline_s:
            # grpc.aio's own status when a write fails because the deadline ended the call (a trivial grpc.aio
            # server gets it too): no server sent it, and what ended the call was the deadline.
            return "DEADLINE_EXCEEDED", "the deadline passed while the client was still writing (grpc.aio: INTERNAL)"
        return code, details

    async def prime(self) -> None:
        """The most popular texts scored once, so that "before" measures a warm cache rather than a cold start
        (the tail of the pool and the new texts still miss)."""
        self.phase, texts = "prime", self.texts.pool[:self.cfg.prime]
        for i in range(0, len(texts), PRIME_BATCH):
            await self.call(self.stubs[0], "batch", texts[i:i + PRIME_BATCH], 60.0)
        self.phase = "before"

    async def client(self, index: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + index)
        stub = self.stubs[index % len(self.stubs)]
        interval, due = self.cfg.clients / self.cfg.rate, time.monotonic()
        while not self.stop.is_set():
            kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
            n = 1 if kind == "unary" else rng.randint(2, 20) if kind == "batch" else rng.randint(2, 10)
            await self.call(stub, kind, [self.texts.pick(rng) for _ in range(n)], self.deadline(rng))
            due = max(due + interval, time.monotonic())
            await asyncio.sleep(due - time.monotonic())

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


def _fold(details: str) -> str:
    """Status details with numbers folded, so that one reason counts once."""
    return re.sub(r"\d+(?:\.\d+)?", "N", details.strip())[:160] or "(no details)"


@dataclass
class Tally:
    calls: Counter = field(default_factory=Counter)         # "kind CODE" -> calls
    item_errors: Counter = field(default_factory=Counter)   # stream texts answered in band with an error, by code
    reasons: dict = field(default_factory=lambda: defaultdict(Counter))   # code -> folded details -> count
    latency: dict = field(default_factory=lambda: defaultdict(list))      # phase -> seconds of its OK calls
    phase_errors: dict = field(default_factory=lambda: defaultdict(Counter))
    seen: dict = field(default_factory=dict)                 # (text, label, score, model, tier) -> [times, phase]
    streams_cut: Counter = field(default_factory=Counter)   # streams that ended non-OK after some answers, by code
    lost: int = 0
    lost_examples: list = field(default_factory=list)
    hung_calls: int = 0
    hung_examples: list = field(default_factory=list)
    odd_examples: dict = field(default_factory=lambda: defaultdict(list))  # code outside ALLOWED -> a few calls

    def _error(self, phase: str, code: str, details: str, example: dict) -> None:
        self.reasons[code][_fold(details)] += 1
        self.phase_errors[phase][code] += 1
        if code not in ALLOWED and len(self.odd_examples[code]) < 3:
            self.odd_examples[code].append({"details": details[:200], "phase": phase, **example})

    def _lost(self, n: int, why: str, phase: str, kind: str) -> None:
        self.lost += n
        if len(self.lost_examples) < EXAMPLES:
            self.lost_examples.append({"kind": kind, "phase": phase, "texts": n, "why": why})

    def record(self, phase: str, kind: str, texts: list[str], got: list, code: str, details: str,
               seconds: float, deadline_s: float | None = None) -> int:
        """One finished call; returns how many of its texts got an answer."""
        self.latency.setdefault(phase, [])  # every phase gets a row, even one without an OK call
        self.calls[f"{kind} {code}"] += 1
        example = {"kind": kind, "texts": len(texts), "answers": len(got), "seconds": round(seconds, 4),
                   "deadline_s": deadline_s and round(deadline_s, 4)}
        if code == "OK":
            self.latency[phase].append(seconds)
        else:
            self._error(phase, code, details, example)
        answered = 0
        for text, response in zip(texts, got):
            if response.HasField("error") and response.error.code:
                name = CODE_NAMES.get(response.error.code, str(response.error.code))
                if kind != "stream":  # unary and batch report failures as the call's status, never in band
                    self._lost(1, f"{kind} answer with an in-band error {name}", phase, kind)
                    continue
                self.item_errors[name] += 1
                self._error(phase, name, response.error.message, {**example, "in_band": True})
            elif response.label:
                entry = self.seen.setdefault((text, response.label, response.score, response.model,
                                              TIER_NAMES.get(response.tier, str(response.tier))), [0, phase])
                entry[0] += 1
                answered += 1
            else:
                self._lost(1, f"a response with neither label nor error (call {code})", phase, kind)
        if len(got) > len(texts):
            self._lost(len(got) - len(texts), f"{len(got)} responses for {len(texts)} texts", phase, kind)
        elif len(got) < len(texts):
            if code == "OK":
                self._lost(len(texts) - len(got), f"{code} with {len(got)} of {len(texts)} answers", phase, kind)
            elif got:
                self.streams_cut[code] += 1
        return answered

    def hung(self, phase: str, kind: str, texts: int, deadline_s: float, answered: int) -> None:
        self.hung_calls += 1
        self.latency.setdefault(phase, [])
        self.phase_errors[phase]["HUNG"] += 1
        if len(self.hung_examples) < EXAMPLES:
            self.hung_examples.append({"kind": kind, "phase": phase, "texts": texts, "answered": answered,
                                       "deadline_s": round(deadline_s, 3)})

    def texts(self) -> list[str]:
        """The distinct answered texts, normalized, in first-answered order."""
        return list(dict.fromkeys(normalize_text(key[0]) for key in self.seen))
