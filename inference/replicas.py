"""Spreads a gateway's misses over several inference services.

Each call goes to the connected replica with the least load (its queue depth
as last reported, or this gateway's unanswered texts on it, whichever is
larger) rather than blind round robin: a replica that is slow or busy with
other gateways' texts gets fewer. A replica that dies is skipped, and texts
that were in flight on it are sent to another while the caller's deadline
allows. All replicas should serve the same model; while they do not (a
rolling upgrade), calls go only to replicas of the model most of them serve,
so cache keys and answers stay consistent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from inference.client import InferenceClient, InferenceUnavailable, RemoteModel

__all__ = ["ReplicaSet"]

log = logging.getLogger(__name__)


class ReplicaSet:
    def __init__(self, targets: list[str]) -> None:
        if not targets:
            raise ValueError("at least one inference service address is required")
        if len(set(targets)) != len(targets):
            raise ValueError(f"inference addresses repeat: {','.join(targets)}")
        self.targets = targets
        self.clients = [InferenceClient(t, on_change=self._elect_model) for t in targets]
        # Read on every call's hot path, so it is kept up to date on changes, not computed per call.
        self.model: RemoteModel | None = None

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
        if elected != self.model:  # keep the same object otherwise: callers compare by identity
            self.model = elected

    @property
    def in_flight(self) -> int:
        """Texts sent to any replica and not answered yet."""
        return sum(c.in_flight for c in self.clients)

    async def wait_connected(self, timeout: float) -> RemoteModel:
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

    def _pick(self, exclude: set[int]) -> InferenceClient | None:
        model = self.model
        best = None
        for i, client in enumerate(self.clients):
            if i in exclude or not client.connected or client.model != model:
                continue
            if best is None or client.load < best.load:
                best = client
        return best

    async def score(self, texts: list[str], timeout: float | None = None) -> tuple[list, str]:
        """Like InferenceClient.score, on the least loaded replica; retried on
        another replica when the chosen one dies mid-call."""
        deadline = time.monotonic() + timeout if timeout else None
        tried: set[int] = set()
        while True:
            client = self._pick(tried)
            if client is None:
                raise InferenceUnavailable(
                    f"no inference service is reachable ({', '.join(self.targets)})" if len(self.targets) > 1
                    else f"the inference service at {self.targets[0]} is not reachable"
                )
            tried.add(self.clients.index(client))
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("deadline passed while looking for an inference service")
            try:
                results, fingerprint = await client.score(texts, left)
            except InferenceUnavailable:
                continue
            lost = [i for i, r in enumerate(results) if isinstance(r, InferenceUnavailable)]
            if not lost or len(tried) == len(self.clients):
                return results, fingerprint
            log.warning("inference service %s went away with %d texts in flight; resending them", client.target, len(lost))
            try:
                again, _ = await self.score([texts[i] for i in lost], None if deadline is None else deadline - time.monotonic())
            except InferenceUnavailable:
                return results, fingerprint
            for i, r in zip(lost, again):
                results[i] = r
            return results, fingerprint
