"""Spreads a gateway's misses over several inference services: the gateway's Upstream.

Each call goes to the connected replica with the least load (its queue depth
as last reported, or this gateway's unanswered texts on it, whichever is
larger), ties broken at random so that equal replicas share the work. A
replica that dies is skipped, and texts that were in flight on it are sent to
another while the caller's deadline allows.

All replicas should serve the same model; while they do not (a rolling
upgrade), calls go only to replicas of the model most of them serve (the
elected model). Whatever happens, each answer carries the model that really
scored it, so the cache stores it under that model's key and the caller is
told that model: a resend that lands on another model is still answered
truthfully, never passed off as the elected one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Callable, Sequence

from cache.upstream import Failed, ModelRef, Outcome
from inference.client import InferenceClient
from protos.errors import DeadlineExceeded, Lost, Unavailable
from protos.security import ClientSecurity

__all__ = ["ReplicaSet"]

log = logging.getLogger(__name__)


class ReplicaSet:
    """The production Upstream (cache.upstream): a set of inference clients."""

    def __init__(self, targets: list[str], *, rng: random.Random | None = None,
                 on_model_change: Callable[[ModelRef], None] | None = None,
                 security: ClientSecurity = ClientSecurity()) -> None:
        if not targets:
            raise ValueError("at least one inference service address is required")
        if len(set(targets)) != len(targets):
            raise ValueError(f"inference addresses repeat: {','.join(targets)}")
        self.targets = targets
        self.clients = [InferenceClient(t, on_change=self._elect_model, security=security) for t in targets]
        self._rng = rng or random.Random()
        # Read on every call's hot path, so kept up to date on changes, not computed per call.
        self.model: ModelRef | None = None
        self.generation = 0  # +1 on every change of the elected model
        self.counters: Counter[str] = Counter()
        self._on_model_change = on_model_change

    def start(self) -> None:
        for client in self.clients:
            client.start()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    def _elect_model(self) -> None:
        """The model most connected replicas serve becomes the gateway's model."""
        models = [c.model for c in self.clients if c.connected and c.model is not None]
        if not models:
            return  # none connected: keep answering hits for the last known model
        counts = Counter(m.fingerprint for m in models)
        best = max(counts, key=lambda fp: (counts[fp], fp))
        elected = next(m for m in models if m.fingerprint == best)
        if elected != self.model:
            if self.model is not None:
                log.warning("the gateway now serves %s (was %s)", elected.display, self.model.display)
            self.model = elected
            self.generation += 1
            if self._on_model_change is not None:
                self._on_model_change(elected)

    @property
    def in_flight(self) -> int:
        """Texts sent to any replica and not answered yet."""
        return sum(c.in_flight for c in self.clients)

    @property
    def connected(self) -> bool:
        return any(c.connected for c in self.clients)

    async def wait_connected(self, timeout: float) -> ModelRef:
        waiters = [asyncio.ensure_future(c.wait_connected(timeout)) for c in self.clients]
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not any(w.done() and not w.exception() for w in done):
                raise TimeoutError
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return self.model

    async def stats(self, timeout: float = 2.0) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for client in self.clients:
            if client.connected:
                totals.update(await client.stats(timeout))
        return dict(totals)

    def _pick(self, exclude: set[int]) -> int | None:
        """Index of the least loaded connected replica of the elected model, ties at random."""
        model = self.model
        best: list[int] = []
        best_load = None
        for i, client in enumerate(self.clients):
            if i in exclude or not client.connected or client.model != model:
                continue
            load = client.load
            if best_load is None or load < best_load:
                best, best_load = [i], load
            elif load == best_load:
                best.append(i)
        if not best:
            return None
        return best[0] if len(best) == 1 else self._rng.choice(best)

    def _unavailable(self) -> Unavailable:
        if len(self.targets) > 1:
            return Unavailable(f"no inference service is reachable ({', '.join(self.targets)}); "
                               "cached texts are still served; retry with backoff")
        return Unavailable(f"the inference service at {self.targets[0]} is not reachable; "
                           "cached texts are still served; retry with backoff")

    async def score(self, texts: Sequence[str], deadline: float | None) -> list[Outcome]:
        """One Outcome per text, each tagged with the model that scored it. Texts
        lost with a dying replica are resent to another one while `deadline`
        allows; a resend never goes back to a replica already tried."""
        outcomes: list[Outcome | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        tried: set[int] = set()
        while todo:
            index = self._pick(tried)
            if index is None:
                failure = Failed(self._unavailable())
                for i in todo:
                    outcomes[i] = failure
                break
            if deadline is not None and deadline <= time.monotonic():
                late = Failed(DeadlineExceeded("deadline exceeded while looking for an inference service"))
                for i in todo:
                    outcomes[i] = late
                break
            tried.add(index)
            client = self.clients[index]
            got = await client.score([texts[i] for i in todo], deadline)
            lost = []
            for i, outcome in zip(todo, got):
                outcomes[i] = outcome
                if isinstance(outcome, Failed) and isinstance(outcome.error, Lost):
                    lost.append(i)
            if lost:
                self.counters["resent"] += len(lost)
                log.warning("inference service %s went away with %d texts in flight; resending them",
                            client.target, len(lost))
            todo = lost
        return outcomes  # type: ignore[return-value]  # every slot is filled
