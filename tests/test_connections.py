"""Client connections to a real gateway: keepalive pings and connection age."""

from __future__ import annotations

import time

import grpc

from protos import classifier_pb2, classifier_pb2_grpc
from tests.helpers import eventually

PING_EVERY_MS = 6_000  # gRPC's default server policy cuts such a client off at its third ping (~18 s)


def _call(channel: grpc.Channel) -> classifier_pb2.ClassifyResponse:
    return classifier_pb2_grpc.ClassifierStub(channel).Classify(classifier_pb2.ClassifyRequest(text="kept alive"),
                                                               timeout=10)


def test_a_client_that_pings_every_few_seconds_is_not_cut_off(procs, tmp_path, tiny_model):
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2")
    options = [("grpc.keepalive_time_ms", PING_EVERY_MS), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with grpc.insecure_channel(gateway.address, options=options) as channel:
        _call(channel)
        states = []
        channel.subscribe(states.append)
        time.sleep(3.5 * PING_EVERY_MS / 1000)  # three pings and more, no calls
        assert channel._channel.check_connectivity_state(False) == grpc.ChannelConnectivity.READY.value[0]
        assert grpc.ChannelConnectivity.IDLE not in states and grpc.ChannelConnectivity.TRANSIENT_FAILURE not in states
        assert _call(channel).label


def test_max_connection_age_makes_a_client_reconnect_without_failing_calls(procs, tmp_path, tiny_model):
    gateway = procs.gateway(procs.inference(tiny_model), tmp_path / "l2", None, "--max-connection-age-s", "1",
                            "--max-connection-age-grace-s", "1")
    with grpc.insecure_channel(gateway.address) as channel:
        _call(channel)
        states = []
        channel.subscribe(states.append)
        eventually(lambda: grpc.ChannelConnectivity.IDLE in states, timeout_s=15)  # GOAWAY after the age
        for _ in range(5):
            assert _call(channel).label  # reconnects by itself
