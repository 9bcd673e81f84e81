"""What the last load of a model said about it, kept so the next run can use
its cache before (or without) loading the model. Light: no torch.

Cache keys are made from the model's fingerprint, and the fingerprint is a
hash of the loaded weights, so without a record a gateway must load the model
before it can look anything up. `tiergate classify` over rows that are all in
L2 would then spend its whole run loading a model it never calls. A record
holds the ModelRef that a load of one checkpoint directory with one set of
answer-deciding flags produced, and a signature of the directory's files (name,
size, mtime): it is used only while the signature still matches, so a changed
checkpoint is loaded again. Should a record still be wrong (say the machine
gained a GPU, which changes --device auto), every answer still names the model
that produced it, and the first miss loads the real model, whose fingerprint
then takes over (the Upstream's generation changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib

from cache.upstream import ModelRef
from inference.paths import cache_root

__all__ = ["ModelRecords", "checkpoint_signature"]

log = logging.getLogger(__name__)

_VERSION = 1


def checkpoint_signature(directory: pathlib.Path) -> list[list]:
    """Every file of a checkpoint directory (recursively) with its size and mtime."""
    files = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            st = path.stat()
            files.append([str(path.relative_to(directory)), st.st_size, st.st_mtime_ns])
    return files


class ModelRecords:
    """Records of served models, one JSON file per (checkpoint, answer-deciding flags)."""

    def __init__(self, root: pathlib.Path | None = None) -> None:
        self.root = root if root is not None else cache_root() / "models" / "records"

    def _path(self, checkpoint: pathlib.Path, flags: dict[str, str]) -> pathlib.Path:
        # --device auto picks CUDA where torch sees a GPU; its driver's device
        # node is the cheap hint of that which needs no torch.
        key = json.dumps([str(checkpoint.resolve()), sorted(flags.items()),
                          flags.get("device") == "auto" and os.path.exists("/dev/nvidiactl")])
        return self.root / (hashlib.blake2b(key.encode(), digest_size=12).hexdigest() + ".json")

    def lookup(self, checkpoint: pathlib.Path, flags: dict[str, str]) -> ModelRef | None:
        """The model a load of `checkpoint` with `flags` produced last time, or
        None (never loaded so, or the checkpoint's files changed since)."""
        if not checkpoint.is_dir():
            return None  # a hub id: nothing to check a record against
        try:
            record = json.loads(self._path(checkpoint, flags).read_text(encoding="utf-8"))
            if record.get("version") != _VERSION or record.get("files") != checkpoint_signature(checkpoint):
                return None
            m = record["model"]
            return ModelRef(m["model_id"], tuple(m["labels"]), m["fingerprint"], m["device"], m["dtype"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: the model is loaded first, as without records

    def store(self, checkpoint: pathlib.Path, flags: dict[str, str], model: ModelRef) -> None:
        """Remember what loading `checkpoint` with `flags` produced (best effort)."""
        if not checkpoint.is_dir():
            return
        record = {"version": _VERSION, "files": checkpoint_signature(checkpoint),
                  "model": {"model_id": model.model_id, "labels": list(model.labels),
                            "fingerprint": model.fingerprint, "device": model.device, "dtype": model.dtype}}
        path = self._path(checkpoint, flags)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot keep a record of model %s: %s", model.display, exc)
