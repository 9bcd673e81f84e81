"""The stack `tiergate classify` runs for itself when it is given no --target.

An in-process gateway on a free local port, whose misses go to an inference
child that starts only when the first text misses every tier (LazyUpstream).
For that the gateway must know the model's fingerprint before loading it: it
takes it from the record of the last load with the same checkpoint and flags
(inference.model_record). Without a record (the first run, or a changed
checkpoint) the model is loaded first, as before, and recorded for next time.
"""

from __future__ import annotations

import dataclasses
import pathlib

from gateway.lazy_upstream import LazyUpstream
from gateway.server import GatewayConfig, GatewayServer
from gateway.stack import InferenceProcess
from inference.model_record import ModelRecords
from inference.paths import default_model_dir

__all__ = ["EmbeddedStack"]

_MODEL_READY_TIMEOUT_S = 900.0  # the first start may build the default model


class EmbeddedStack:
    def __init__(self, config: GatewayConfig, model_args: list[str], *, model: str | None, answer_flags: dict[str, str],
                 log_level: str | None, records: ModelRecords | None = None) -> None:
        """`model_args`: flags for `tiergate inference`; `model`: its --model
        (None: the default model); `answer_flags`: the flags that decide the
        answers (device, quantize), which a record must match."""
        # Port 0 on loopback: nobody else is meant to call this gateway. No
        # Bloom filter: warming it from a large shared L2 costs seconds a
        # one-off job never earns back, and every lookup it would skip is one
        # LMDB read.
        self.config = dataclasses.replace(config, host="127.0.0.1", port=0, l2_filter=False, inference_targets=())
        self._checkpoint = pathlib.Path(model).expanduser() if model else default_model_dir()
        self._flags = answer_flags
        self._records = records or ModelRecords()
        self._service = InferenceProcess(model_args, log_level=log_level)
        self.upstream: LazyUpstream | None = None
        self.server: GatewayServer | None = None

    @property
    def model_started(self) -> bool:
        return self.upstream is not None and self.upstream.started

    async def start(self) -> str:
        """Start serving; the address of the gateway."""
        recorded = self._records.lookup(self._checkpoint, self._flags)
        self.upstream = LazyUpstream(self._service, recorded,
                                     on_model=lambda m: self._records.store(self._checkpoint, self._flags, m))
        if recorded is None:
            await self.upstream.start_now(_MODEL_READY_TIMEOUT_S)
        self.server = GatewayServer(self.config, upstream=self.upstream)
        await self.server.start(wait_for_inference=False)
        return self.server.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)  # closes the upstream, which stops the inference child
        elif self.upstream is not None:
            await self.upstream.close()
