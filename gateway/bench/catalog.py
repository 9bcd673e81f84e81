"""Every scenario of `tiergate bench`, in the order the default list runs them.

The scenario modules register themselves with scenarios.scenario when
imported; this module imports them all, so nothing else depends on which
module holds which scenario (and none of them imports another's registry
back: no import cycles). miss_scenarios imports scenarios, so the hit, zipf
and baseline scenarios always come first; then the miss path, overload last
of it; classify_scenario imports miss_scenarios, so classify (a baseline:
in the default list only with --compare) comes after everything.
"""

from __future__ import annotations

from gateway.bench import miss_scenarios  # noqa: F401  (importing it registers the miss-path scenarios)
from gateway.bench import classify_scenario  # noqa: F401  (registers classify: after overload, with --compare)
from gateway.bench import metrics_scenario  # noqa: F401  (registers metrics-cost: last, with --compare)
from gateway.bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "default_scenarios", "check_scenarios"]


def default_scenarios(compare: bool) -> tuple[str, ...]:
    return tuple(s.name for s in SCENARIOS.values() if compare or not s.baseline)


def check_scenarios(names: tuple[str, ...]) -> None:
    """ValueError naming the first unknown scenario."""
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
