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

    def publish(self, sections: dict[str, dict[str, float]]) -> None:
        if self.directory is None:
            return
        tmp = self.directory / f".{self.pid}.json.tmp"
        tmp.write_text(json.dumps(sections))
        os.replace(tmp, self.directory / f"{self.pid}.json")

    def withdraw(self) -> None:
        if self.directory is not None:
            (self.directory / f"{self.pid}.json").unlink(missing_ok=True)

    def total(self, section: str, own: dict[str, float]) -> tuple[dict[str, float], int]:
        """(one section's numbers summed over live workers, how many workers were counted)."""
        summed: Counter[str] = Counter(own)
        workers = 1
        if self.directory is not None:
            for path in self.directory.glob("*.json"):
                pid = int(path.stem)
                if pid == self.pid or not _alive(pid):
                    continue
                try:
                    summed.update(json.loads(path.read_text()).get(section, {}))
                except (OSError, ValueError):
                    continue  # a worker mid-exit; its numbers are gone with it
                workers += 1
        return dict(summed), workers
