"""Small helpers for the end-to-end tests."""

from __future__ import annotations

import pathlib
import time
from typing import Callable, TypeVar

import grpc

from protos import inference_pb2, inference_pb2_grpc

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout_s: float = 20.0, interval_s: float = 0.05) -> T:
    """Polls check() until it returns a truthy value without raising; returns that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
            error = None
        except Exception as exc:  # noqa: BLE001  (reported if it never succeeds)
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last error: {error!r})")
        time.sleep(interval_s)


def inference_counters(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return dict(stub.GetStats(inference_pb2.InferenceStatsRequest(), timeout=5).counters)


def describe_model(address: str) -> inference_pb2.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return inference_pb2_grpc.InferenceStub(channel).Describe(inference_pb2.DescribeRequest(), timeout=5)


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids
