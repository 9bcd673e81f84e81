"""Counters of every worker process of one gateway, added up in one place.

Each worker publishes a snapshot of its numbers to a small JSON file in a
directory the workers share (atomically: write, then rename) a few times a
second, in named sections (its GetStats counters, its Prometheus samples);
any worker answering GetStats or a scrape sums its own live numbers with the
other live workers' latest snapshots. Other workers' numbers are therefore up
to PUBLISH_INTERVAL_S behind.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import Counter
from typing import Callable

__all__ = ["StatsBoard", "PUBLISH_INTERVAL_S"]

PUBLISH_INTERVAL_S = 0.25


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatsBoard:
    def __init__(self, directory: str | None) -> None:
        self.directory = pathlib.Path(directory) if directory else None
        self.pid = os.getpid()
        self._last: dict[tuple[int, str], dict[str, float]] = {}  # (pid, section) -> its last readable snapshot

    def publish(self, sections: dict[str, dict[str, float]]) -> None:
        if self.directory is None:
            return
        tmp = self.directory / f".{self.pid}.json.tmp"
        tmp.write_text(json.dumps(sections))
        os.replace(tmp, self.directory / f"{self.pid}.json")

    def withdraw(self) -> None:
        if self.directory is not None:
            (self.directory / f"{self.pid}.json").unlink(missing_ok=True)

    def total(self, section: str, own: dict[str, float], *,
              monotonic: Callable[[str], bool] | None = None) -> tuple[dict[str, float], int]:
        """(one section's numbers summed over live workers, how many workers were counted).

        monotonic(key): the key is a counter that must never go down (Prometheus
        reads a drop as a reset and the whole new value as an increase): then a
        worker that died keeps its last published value of such keys in the
        sum, and a snapshot that cannot be read this time counts as the last
        one that could."""
        summed: Counter[str] = Counter(own)
        workers = 1
        if self.directory is not None:
            seen = {self.pid}
            for path in self.directory.glob("*.json"):
                pid = int(path.stem)
                if pid in seen:
                    continue
                seen.add(pid)
                alive = _alive(pid)
                try:
                    numbers = json.loads(path.read_text()).get(section, {})
                    self._last[(pid, section)] = numbers
                except (OSError, ValueError):
                    numbers = self._last.get((pid, section), {})  # a worker mid-write or mid-exit
                if alive:
                    summed.update(numbers)
                    workers += 1
                elif monotonic is not None:
                    summed.update({k: v for k, v in numbers.items() if monotonic(k)})
            if monotonic is not None:  # workers whose file is gone (withdrawn at their stop)
                for (pid, sec), numbers in self._last.items():
                    if sec == section and pid not in seen:
                        summed.update({k: v for k, v in numbers.items() if monotonic(k)})
        return dict(summed), workers
