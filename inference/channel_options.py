"""gRPC channel/server options both sides of the inference stream must agree on.

Keepalive pings keep the long-lived stream honest about a dead peer; the
server must permit the client's ping interval or it answers "too many pings"
and kills the stream, so both sides take their numbers from here.
"""

from __future__ import annotations

__all__ = ["CLIENT_OPTIONS", "SERVER_OPTIONS", "MAX_MESSAGE_BYTES", "MESSAGE_MAX_ITEMS", "server_options"]

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 5_000
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one stream message may carry thousands of texts
# Texts (and cancel ids) in one message the gateway's client sends, at most:
# the service refuses more than its --max-message-texts, which cannot be set below this.
MESSAGE_MAX_ITEMS = 256

CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after the inference service restarts (defaults back off to minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with the service's own receive limit (it follows from its text limits)."""
    return [o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"] + [
        ("grpc.max_receive_message_length", max_receive_bytes)]
