"""The onnxruntime runtime: the model as an exported ONNX graph, with no torch in the process.

Measured on a 2-core AMD EPYC with AVX-512 (default model, texts of 40-80
tokens, each runtime in a fresh process): onnxruntime float32 scored 256
texts/s against torch's 124 (2 lanes of 1 thread, batches of 4), with the
same labels on every text, probabilities within 1.1e-6 of torch's, answers
identical alone and in any padded batch, 190 MB resident against torch's 434,
and 0.13 s to load against 2.4 s. So `--runtime auto` serves models on a
CPU with it; torch stays for TorchScript on request and CUDA.

Two precisions, each exported once per checkpoint (inference.onnx_export):
float32, and int8 with a scale per token (inference.onnx_int8), whose
answers, like float32's, never depend on the batch. `--quantize auto`
serves int8 only where its export measured every bar passed (int8_verdict):
label agreement with float32 on texts unlike the training data, held-out
accuracy (so only for a model tiergate built), and speed on this CPU.

The same interface as inference.model.SequenceClassifier: load(), info,
tokenize(), forward(), score().
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import threading
import time

from inference.model import (INT8_MAX_ACCURACY_LOSS, ModelConfig, ModelInfo, _lower_thread_priority, plan_lanes,
                             texts_per_pass)
from inference.model_record import checkpoint_signature
from inference.onnx_export import GRAPH, MANIFEST, VERSION, softmax
from inference.paths import BUILD_INFO_FILE, cache_root
from inference.probes import PROBE_TEXTS, PROBES

__all__ = ["OnnxClassifier", "OnnxUnavailable", "graph_dir", "int8_verdict", "INT8_MIN_AGREEMENT", "INT8_DTYPE"]

log = logging.getLogger(__name__)

_EXPORT_TIMEOUT_S = 900.0
INT8_DTYPE = "int8-per-token"  # ModelInfo.dtype of the int8 graph (inference.onnx_int8)
# --quantize auto serves the int8 graph only where its export measured at
# least this much label agreement with float32 on texts unlike the training
# data, held-out accuracy within INT8_MAX_ACCURACY_LOSS of float32's, and
# more speed than float32 on this machine's cores.
INT8_MIN_AGREEMENT = 0.98


def int8_verdict(check: dict) -> str | None:
    """None when the int8 export's figures pass every bar of --quantize auto, else why not."""
    agreement, accuracy, fp32 = check.get("agreement"), check.get("accuracy"), check.get("accuracy_float32")
    speed = check.get("texts_per_s") or {}
    if agreement is None or agreement < INT8_MIN_AGREEMENT:
        return (f"it agrees with float32 on {100 * (agreement or 0):.1f}% of {check.get('agreement_texts', 0)} "
                f"texts unlike the training data (at least {100 * INT8_MIN_AGREEMENT:.0f}% needed)")
    if accuracy is None or fp32 is None:
        return "the model has no held-out set to measure int8's accuracy on (only models tiergate built have)"
    if round(fp32 - accuracy, 9) > INT8_MAX_ACCURACY_LOSS:  # exactly 1 point is within the bar
        return f"it loses {100 * (fp32 - accuracy):.2f} points of held-out accuracy (at most {100 * INT8_MAX_ACCURACY_LOSS:.0f})"
    if not speed.get("int8", 0) > speed.get("float32", 0):
        return f"it is no faster than float32 on this CPU ({speed.get('int8')} vs {speed.get('float32')} texts/s)"
    return None


def _describe(check: dict) -> str:
    speed = check.get("texts_per_s") or {}
    accuracy = (f", held-out accuracy {check['accuracy']:.4f} vs float32's {check['accuracy_float32']:.4f}"
                if check.get("accuracy") is not None else "")
    ratio = speed.get("int8", 0) / speed["float32"] if speed.get("float32") else 0
    return (f"agrees with float32 on {100 * check.get('agreement', 0):.2f}% of {check.get('agreement_texts', 0)} "
            f"texts unlike the training data{accuracy}, {ratio:.2f}x float32's speed on one core here")


def _remove_abandoned_exports(directory: pathlib.Path) -> None:
    """An export killed at its timeout leaves its temporary directory (100+ MB): remove those older than it."""
    cutoff = time.time() - _EXPORT_TIMEOUT_S
    for leftover in directory.glob(".export-*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


class OnnxUnavailable(RuntimeError):
    """This model cannot be served with onnxruntime here (the message says why)."""


def graph_dir(checkpoint: pathlib.Path, precision: str = "float32") -> pathlib.Path:
    """Where the exported graph of a checkpoint in one precision lives: under the
    cache dir, since the checkpoint's own directory may be read-only."""
    key = hashlib.blake2b(str(checkpoint.resolve()).encode(), digest_size=8).hexdigest()
    suffix = "" if precision == "float32" else f"-{precision}"
    return cache_root() / "models" / "onnx" / f"{checkpoint.name}-{key}{suffix}"


_ENCODED_KEPT = 8192  # encodings kept between count_tokens and tokenize (the queue holds at most --max-queue texts)


class OnnxClassifier:
    encodes_when_counting = True  # count_tokens keeps the encoding: tokenize then only pads (cheap)

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.info: ModelInfo | None = None
        self._session = None
        self._tokenizer = None
        self._encoded: dict = {}  # text -> its Encoding, from count_tokens until tokenize takes it
        self._labels: tuple[str, ...] = ()
        self._inputs: list[str] = []
        self._pad_id = 0
        self._max_texts: int | None = None
        self._tuned = threading.local()
        self.check: dict = {}

    def _manifest(self, checkpoint: pathlib.Path, where: pathlib.Path, precision: str) -> dict | None:
        try:
            manifest = json.loads((where / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("check"), dict):
            return None  # damaged: exported again
        fresh = (manifest.get("version") == VERSION and manifest.get("files") == checkpoint_signature(checkpoint)
                 and manifest.get("max_length") == self.config.max_length and (where / GRAPH).is_file()
                 and manifest.get("precision", "float32") == precision)
        if fresh and precision == "int8":
            from inference.onnx_int8 import cpu_has_vnni, recipe  # light: no torch, no onnx

            # A graph made by another recipe, or for another kind of CPU (a
            # cache dir copied over: its weight bits are not this one's).
            fresh = manifest["check"].get("recipe") == recipe(8 if cpu_has_vnni() else 7)
        return manifest if fresh else None

    def _graph(self, checkpoint: pathlib.Path, precision: str) -> tuple[pathlib.Path, dict]:
        where = graph_dir(checkpoint, precision)
        manifest = self._manifest(checkpoint, where, precision)
        if manifest is not None:
            return where, manifest
        where.parent.mkdir(parents=True, exist_ok=True)
        # One export at a time per graph (serve and classify, or two replicas,
        # sharing a cache dir); whoever waited reads what the other one wrote.
        with open(where.parent / f".{where.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self._manifest(checkpoint, where, precision)
            if manifest is None:
                _remove_abandoned_exports(where.parent)
                manifest = self._export(checkpoint, where, precision)
        return where, manifest

    def _export(self, checkpoint: pathlib.Path, where: pathlib.Path, precision: str) -> dict:
        log.info("exporting %s to an ONNX graph in %s (once per checkpoint%s)", checkpoint, precision,
                 ": int8 is measured against float32 first, about a minute" if precision == "int8" else "")
        argv = [sys.executable, "-m", "inference.onnx_export", "--model", str(checkpoint), "--out", str(where),
                "--max-length", str(self.config.max_length), "--precision", precision]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=_EXPORT_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise OnnxUnavailable(f"exporting the ONNX graph took over {_EXPORT_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise OnnxUnavailable(last.removeprefix("export failed: "))
        manifest = self._manifest(checkpoint, where, precision)
        if manifest is None:
            raise OnnxUnavailable("the export wrote no usable graph")
        return manifest

    def _choose(self, checkpoint: pathlib.Path) -> tuple[pathlib.Path, dict]:
        """The graph to serve: float32 or int8, by --quantize (auto: int8 where its export passed every bar)."""
        quantize = self.config.quantize
        if quantize is None and not (checkpoint / BUILD_INFO_FILE).is_file():
            log.info("serving float32, not int8: the model has no held-out set to measure int8's accuracy on "
                     "(only models tiergate built have; --quantize on serves int8 anyway)")
            return self._graph(checkpoint, "float32")
        if quantize is False:
            return self._graph(checkpoint, "float32")
        try:
            where, manifest = self._graph(checkpoint, "int8")
        except OnnxUnavailable as exc:
            if quantize:
                raise
            log.warning("serving float32: the int8 graph could not be made (%s)", exc)
            return self._graph(checkpoint, "float32")
        why_not = int8_verdict(manifest["check"])
        if quantize is None and why_not:
            log.info("serving float32, not int8: %s", why_not)
            return self._graph(checkpoint, "float32")
        if why_not:
            log.warning("serving int8 as --quantize on asks, although %s", why_not)
        log.info("serving int8: it %s", _describe(manifest["check"]))
        return where, manifest

    def load(self) -> ModelInfo:
        cfg = self.config
        checkpoint = pathlib.Path(cfg.source).expanduser()
        if not checkpoint.is_dir():
            raise OnnxUnavailable(f"{cfg.source!r} is not a checkpoint directory")
        try:
            import numpy  # noqa: F401
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OnnxUnavailable(f"{exc.name} is not installed") from None
        if not (checkpoint / "tokenizer.json").is_file():  # before any export is tried
            raise OnnxUnavailable(f"{checkpoint} has no tokenizer.json (a fast tokenizer), which the onnxruntime "
                                  "runtime needs")
        where, manifest = self._choose(checkpoint)
        dtype = INT8_DTYPE if manifest.get("precision") == "int8" else "float32"

        lanes, threads = plan_lanes("cpu", cfg.lanes, cfg.threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
        # The session's worker threads are started by the thread that creates
        # it and inherit its priority: create it from a thread made nicer, so
        # that answering calls never waits behind a forward pass for a core.
        made: dict = {}

        def create() -> None:
            _lower_thread_priority(cfg.nice)
            try:
                made["session"] = onnxruntime.InferenceSession(str(where / GRAPH), options,
                                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # handed to the loading thread
                made["error"] = exc

        maker = threading.Thread(target=create, name="tiergate-onnx-load")
        maker.start()
        maker.join()
        if "error" in made:
            raise OnnxUnavailable(f"onnxruntime cannot load the graph: {made['error']}")
        self._session = made["session"]
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(cfg.max_length)
        self._tokenizer = tokenizer
        self._labels = tuple(manifest["labels"])
        self._inputs = list(manifest["inputs"])
        self._pad_id = int(manifest["pad_id"])
        self._max_texts = self._check_batch_invariance()
        self.info = ModelInfo(manifest["model_id"], self._labels, manifest["fingerprint"], "cpu", dtype, lanes,
                              threads, "onnxruntime", self._max_texts)
        self.check = manifest["check"]  # what the export measured (int8: agreement, accuracy, speed)
        log.info("loaded model %s (cpu, %s, onnxruntime, %d lane(s) of %d thread(s)) fingerprint %s",
                 self.info.model_id, dtype, lanes, threads, self.info.fingerprint)
        return self.info

    def _check_batch_invariance(self) -> int | None:
        import numpy as np

        # In the probe groups (at most 9 texts, or 2 of up to 256 tokens), not
        # all at once: onnxruntime's arena keeps the largest pass's memory.
        together = np.concatenate([self._probabilities(self.tokenize(group)) for group in PROBES])
        alone = np.concatenate([self._probabilities(self.tokenize([text])) for text in PROBE_TEXTS])
        return texts_per_pass(float(np.abs(together - alone).max()))

    def count_tokens(self, text: str) -> int:
        """The tokens of one text in a pass (truncated as served): the batcher
        groups by it. The encoding is kept for tokenize(), which would
        otherwise encode the text again (a text is counted when it arrives and
        tokenized when its batch is cut, maybe in another thread; dict
        operations are atomic, and a text whose encoding is gone is simply
        encoded)."""
        encoding = self._tokenizer.encode(text)
        if len(self._encoded) >= _ENCODED_KEPT:
            self._encoded.clear()  # texts counted but never tokenized (dropped, expired) do not pile up
        self._encoded[text] = encoding
        return len(encoding.ids)

    def drop_counted(self) -> None:
        """Forget the encodings count_tokens kept (a caller that counted texts it will not tokenize)."""
        self._encoded.clear()

    def tokenize(self, texts: list[str]) -> dict:
        """Padded int64 arrays, one per graph input (input_ids, attention_mask, token_type_ids)."""
        import numpy as np

        # One text at a time, in this thread: encode_batch hands a few texts to
        # the tokenizers thread pool, whose threads wake on other cores and
        # spin there, taking CPU from the lanes and adding a hop to each pass
        # (batches of 4 ~60-token texts: 80 vs 110-130 us of CPU a text).
        encode, counted = self._tokenizer.encode, self._encoded
        encodings = []
        for text in texts:
            encoding = counted.pop(text, None)
            encodings.append(encoding if encoding is not None else encode(text))
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self._inputs}

    def _probabilities(self, encoded: dict):
        import numpy as np

        return softmax(self._session.run(["logits"], encoded)[0].astype(np.float32))

    def forward(self, encoded: dict) -> list[tuple[str, float]]:
        rows = len(encoded["input_ids"])
        if self._max_texts is not None and rows > self._max_texts:
            raise ValueError(f"a pass of {rows} texts for a model whose answers depend on the batch beyond "
                             f"{self._max_texts} text(s) per pass; score() splits texts as needed")
        if not getattr(self._tuned, "done", False):
            _lower_thread_priority(self.config.nice)  # a lane's thread runs the graph with one intra-op thread
            self._tuned.done = True
        probabilities = self._probabilities(encoded)
        best = probabilities.argmax(axis=-1)
        return [(self._labels[i], float(probabilities[row, i])) for row, i in enumerate(best.tolist())]

    def score(self, texts: list[str]) -> list[tuple[str, float]]:
        if self._session is None:
            raise RuntimeError("OnnxClassifier.score() called before load()")
        step = self._max_texts or max(1, len(texts))
        return [result for start in range(0, len(texts), step)
                for result in self.forward(self.tokenize(texts[start : start + step]))]
