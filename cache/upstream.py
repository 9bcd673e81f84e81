"""The seam between the gateway core and whatever scores misses.

The tiered lookup sends texts that no tier holds to an `Upstream` it is
handed: in production the inference client's ReplicaSet, in unit tests an
in-memory fake. What comes back is one typed value per text: `Scored`, which
carries the model that actually scored it (never the model the caller
expected), or `Failed`, which carries the error for that text alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from protos.errors import TiergateError

__all__ = ["ModelRef", "Scored", "Failed", "Outcome", "Upstream"]


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One model as the gateway knows it. Equal fingerprints mean equal answers."""

    model_id: str
    labels: tuple[str, ...]
    fingerprint: str
    device: str = ""
    dtype: str = ""

    @property
    def display(self) -> str:
        return f"{self.model_id}@{self.fingerprint}"


@dataclass(frozen=True, slots=True)
class Scored:
    label: str
    score: float
    model: ModelRef  # the model that scored this text


@dataclass(frozen=True, slots=True)
class Failed:
    error: TiergateError  # why this one text has no answer; other texts of the call are unaffected


Outcome = Scored | Failed


@runtime_checkable
class Upstream(Protocol):
    """Scores texts. `model` is the model misses go to now (None before any is
    known); `generation` grows by one whenever that model changes, so a cache
    can tell "same model" with one integer compare."""

    model: ModelRef | None
    generation: int

    async def score(self, texts: Sequence[str], deadline: float | None) -> list[Outcome]:
        """One Outcome per text, in order. `deadline` is time.monotonic() based
        (None: none). Never raises for a per-text problem; cancelling the
        awaiting task withdraws the texts."""
        ...
