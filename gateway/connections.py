"""How the gateway treats client connections: keepalive, ping policy, age, streams.

gRPC's server defaults suit few real clients: a client may ping an idle
connection at most every 5 minutes, and the third ping that comes sooner gets
the connection closed with GOAWAY "too_many_pings" (a client with a 10 s
keepalive, as many load balancers and SDKs use, was cut off every ~30 s).
And a connection lives forever, so with SO_REUSEPORT workers a long-lived
client stays on the worker it first reached: a max age makes it reconnect
(after a grace for its calls in flight) and land anew.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConnectionOptions"]


@dataclass(frozen=True)
class ConnectionOptions:
    min_client_ping_s: float = 5.0          # clients may ping at most this often, with or without calls
    keepalive_s: float | None = 60.0        # the server pings an idle connection this often (None: never)
    keepalive_timeout_s: float = 20.0       # and closes it when a ping has no answer within this
    max_connection_age_s: float | None = None   # then GOAWAY: the client reconnects (None: no limit)
    max_connection_age_grace_s: float = 30.0    # calls in flight get this long after that GOAWAY
    max_concurrent_streams: int | None = None   # calls at once on one connection (None: gRPC's default)

    def __post_init__(self) -> None:
        for name in ("min_client_ping_s", "keepalive_timeout_s", "max_connection_age_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("keepalive_s", "max_connection_age_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.max_concurrent_streams is not None and self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, got {self.max_concurrent_streams}")

    def server_options(self) -> list[tuple[str, int]]:
        ms = lambda s: int(s * 1000)  # noqa: E731
        options = [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
        ]
        if self.keepalive_s is not None:
            options.append(("grpc.keepalive_time_ms", ms(self.keepalive_s)))
        if self.max_connection_age_s is not None:
            options += [("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]
        if self.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        return options
