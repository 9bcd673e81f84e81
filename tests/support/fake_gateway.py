"""A fake tiergate.v1.Classifier on a real grpc.aio server (port 0), for unit
tests of the layers above the gateway (`tiergate classify`'s job).

Answers are a pure function of the text (label, score and tier alike), so two
runs over the same rows write the same bytes whatever the batching or timing.
A test controls everything else: a policy called before each call is answered
may delay it or refuse it with any status, and a queue limit refuses every
call that would put more than that many texts in flight at once (the way a
full model queue answers RESOURCE_EXHAUSTED). It records every call it got.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc

__all__ = ["FakeGateway", "Call", "Refuse", "MODEL_DISPLAY", "answer_for"]

MODEL_DISPLAY = "fake-model@f1f1f1f1f1f1"
_TIERS = (pb.TIER_MODEL, pb.TIER_L1, pb.TIER_L2, pb.TIER_L3)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=4).digest()


def answer_for(text: str) -> tuple[str, float, int]:
    """(label, score, tier) the fake gives `text`; the score is exact in float32
    and in the 6 decimals `tiergate classify` writes."""
    d = _digest(text)
    label = "positive" if d[0] % 2 else "negative"
    return label, 0.5 + (d[1] % 32) / 64, _TIERS[d[2] % len(_TIERS)]


@dataclass(frozen=True)
class Call:
    number: int        # 0 for the first call the fake got
    method: str        # "Classify" or "ClassifyBatch"
    texts: list[str]
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass(frozen=True)
class Refuse:
    code: grpc.StatusCode
    message: str


# Called before a call is answered: may sleep; returns a Refuse to fail the call.
Policy = Callable[[Call], Awaitable[Refuse | None]]


async def _answer_all(call: Call) -> Refuse | None:
    return None


class FakeGateway(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, policy: Policy = _answer_all, *, queue_limit: int | None = None,
                 answer_s: float = 0.0, max_message_bytes: int | None = None) -> None:
        """`answer_s`: how long every answered call holds its texts in flight;
        `max_message_bytes`: the server's receive limit (None: gRPC's 4 MiB)."""
        self.max_message_bytes = max_message_bytes
        self.policy = policy
        self.queue_limit = queue_limit
        self.answer_s = answer_s
        self.calls: list[Call] = []
        self.refused: list[tuple[Call, grpc.StatusCode]] = []
        self.in_flight = 0       # texts of calls being answered now
        self.most_in_flight = 0  # of calls that were answered
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        limit = [("grpc.max_receive_message_length", self.max_message_bytes)] if self.max_message_bytes else []
        self._server = grpc.aio.server(options=limit)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def __aenter__(self) -> FakeGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def texts_answered(self) -> list[str]:
        refused = {id(c) for c, _ in self.refused}
        return [t for c in self.calls if id(c) not in refused for t in c.texts]

    async def Classify(self, request, context):
        return (await self._answer(Call(len(self.calls), "Classify", [request.text]), context))[0]

    async def ClassifyBatch(self, request, context):
        results = await self._answer(Call(len(self.calls), "ClassifyBatch", list(request.texts)), context)
        return pb.ClassifyBatchResponse(results=results)

    async def _answer(self, call: Call, context) -> list[pb.ClassifyResponse]:
        self.calls.append(call)
        self.in_flight += len(call.texts)
        try:
            refusal = None
            if self.queue_limit is not None and self.in_flight > self.queue_limit:
                refusal = Refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"the model's queue is full ({self.in_flight} > {self.queue_limit} texts; fake)")
            else:
                refusal = await self.policy(call)
            if refusal is None:
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                await asyncio.sleep(self.answer_s)  # other calls overlap with this one, as on a real gateway
        finally:
            self.in_flight -= len(call.texts)
        if refusal is not None:
            self.refused.append((call, refusal.code))
            await context.abort(refusal.code, refusal.message)
        results = []
        for text in call.texts:
            label, score, tier = answer_for(text)
            results.append(pb.ClassifyResponse(label=label, score=score, tier=tier, model=MODEL_DISPLAY))
        return results
