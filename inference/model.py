"""Loads one sequence-classification model and scores texts with it.

Any Hugging Face AutoModelForSequenceClassification checkpoint works: a local
directory, or a hub id where a hub is reachable. Nothing loads at import time;
call load() once, then score() from one thread at a time.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import pathlib
import sys
import threading
import warnings
from dataclasses import dataclass

from inference.paths import BUILD_INFO_FILE

__all__ = ["ModelConfig", "ModelInfo", "SequenceClassifier", "RUNTIMES", "release_freed_memory", "quantize_int8", "int8_is_safe",
           "BATCH_INVARIANCE_TOLERANCE", "INT8_MEASURED_AS"]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")


@dataclass(frozen=True)
class ModelConfig:
    source: str                # local checkpoint directory or hub id
    device: str = "auto"       # auto (CUDA when present, else CPU), cpu, cuda, cuda:N
    quantize: bool | None = None  # int8 dynamic quantization of Linear layers (CPU only); None: auto
    # Forward passes that may run at once, each in a thread of its own with
    # `threads` torch threads. None: on a CPU one lane per core (at most 4),
    # the cores shared out among them; on CUDA one lane.
    lanes: int | None = None
    threads: int | None = None  # torch threads per lane; None: the lane's share of the cores
    # How much nicer than the rest of the process the model's threads run, so
    # that answering calls (refusals above all) never waits behind a forward
    # pass for a core. Measured under 2x overload on 2 cores: refusals p99
    # 12 ms, max 29 ms with 10; p99 20-57 ms, max 37-106 ms with 0.
    nice: int = 10
    max_length: int = 256      # tokens per text; longer texts are truncated
    # Serve a frozen TorchScript graph of the model (inference/torchscript.py):
    # None (auto) on CPU, where it was measured ~20% faster with lanes.
    torchscript: bool | None = None
    # Freed activation buffers stay in glibc's heap; past this much growth over
    # the RSS after loading they are handed back (see SequenceClassifier.forward).
    memory_headroom_mb: int = 128
    # auto: onnxruntime for a float32 model on a CPU (inference/onnx_model.py
    # says why), else torch; torch or onnxruntime: that one (onnxruntime
    # fails when it cannot serve the model instead of falling back).
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("model source is empty: give a checkpoint directory or a hub id")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"model threads must be >= 1, got {self.threads}")
        if self.lanes is not None and self.lanes < 1:
            raise ValueError(f"model lanes must be >= 1, got {self.lanes}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"model nice must be in 0..19, got {self.nice}")
        if not 8 <= self.max_length <= 8192:
            raise ValueError(f"model max_length must be in 8..8192, got {self.max_length}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"model runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"model device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    labels: tuple[str, ...]
    fingerprint: str  # changes whenever weights, tokenizer, labels or precision change
    device: str
    dtype: str
    lanes: int = 1  # forward passes that may run at once
    threads: int = 1  # torch threads in each
    graph: str = "eager"  # "torchscript" when a traced graph serves the model
    # The most texts one forward pass may hold with each text's answer still a
    # function of the text alone; None: any number. int8-dynamic: 1 (see quantize_int8).
    max_batch_texts: int | None = None


MAX_AUTO_LANES = 4  # past this, more threads per pass rather than more passes at once


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _lower_thread_priority(steps: int) -> None:
    """Makes the calling thread (only it, on Linux) `steps` nicer; elsewhere a no-op."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: run at normal priority
        log.warning("could not lower the model thread's priority: %s", exc)


def plan_lanes(device: str, lanes: int | None, threads: int | None) -> tuple[int, int]:
    """(lanes, torch threads per lane) for the device and what the user asked for."""
    cores = available_cores()
    if lanes is None:
        if device != "cpu":
            lanes = 1  # one GPU stream; concurrent passes would only queue on it
        elif threads is not None:
            lanes = max(1, cores // threads)
        else:
            lanes = max(1, min(cores, MAX_AUTO_LANES))
    if threads is None:
        threads = max(1, cores // lanes)
    return lanes, threads


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise). No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


INT8_MAX_ACCURACY_LOSS = 0.01  # auto quantization only where the build measured at most this loss
# How tiergate_build.json says its accuracy_int8 was measured: as served. Builds
# before it scored int8 in padded batches of 128, whose shared activation scale
# gave other answers (the default model: 0.8815 then, 0.8730 one text per pass).
INT8_MEASURED_AS = "one text per pass"


def int8_is_safe(checkpoint: pathlib.Path) -> bool:
    """Whether the checkpoint's tiergate_build.json shows int8, scored as the
    service scores it, within a point of fp32.

    Models without that record (any model tiergate did not build, or built
    before int8 was measured as served) are not quantized automatically:
    nobody measured what it costs them.
    """
    try:
        info = json.loads((checkpoint / BUILD_INFO_FILE).read_text(encoding="utf-8"))
        return (info["int8_measured_as"] == INT8_MEASURED_AS
                and info["accuracy"] - info["accuracy_int8"] <= INT8_MAX_ACCURACY_LOSS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# Scores of one text alone and beside others may differ by this much at most
# (float rounding: float32 measured 7e-7 on the default model, texts of 1 to
# 256 tokens in one padded batch). More, and the model is served one text per pass.
BATCH_INVARIANCE_TOLERANCE = 1e-5

# What decides int8-dynamic answers besides the weights: one text per pass. It
# is hashed into the fingerprint, so answers cached when int8 passes held
# several texts (and so depended on them) are never served as this model's.
INT8_DYNAMIC_PASS = b"int8-dynamic, one text per pass"


def quantize_int8(model):
    """int8 dynamic quantization of every Linear layer (CPU inference).

    Weights are quantized per output channel: on the default model per-tensor
    scales cost 1.4 points of held-out accuracy, per-channel 0.35. Activations
    get one scale per Linear call, from the min and max of the whole pass,
    padding included: batched, a text's answer depends on every text beside it
    (measured: 197 of 200 scores moved by over 1e-4, 13 labels flipped, in
    batches of 4). So an int8 model scores one text per pass
    (ModelInfo.max_batch_texts = 1), which cost 7% here (AVX2, 2 lanes: 137
    vs 148 texts/s). Per-row activation scales (each token its own, through
    fbgemm with the rows mapped onto [0, 1]) are no way out: quantization turns
    the float rounding that padding causes in attention into score changes of
    up to 0.04, so they too need one text per pass, where they were as fast as
    float32 here (85 vs 84 texts/s); torch._int_mm, which takes per-row scales,
    is ~100x slower than fbgemm on AVX2.
    """
    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a
        # dependency here); in torch 2.13 it works and is what we pin.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.ao.quantization")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantized tensor creation")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def _fingerprint_source(model, labels: tuple[str, ...], tokenizer):
    """A hash of what decides the answers: weights, labels, tokenizer (precision is added by the caller)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # Hash the tensor's own buffer: .tobytes() would copy every weight once more.
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    digest.update("\x00".join(labels).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    return digest


class _DropLossTypeWarning(logging.Filter):
    """transformers warns "`loss_type=None` was set in the config but it is
    unrecognized" whenever something reads model.loss_function, as tracing
    does; a loss is never computed here, so that one line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`loss_type=")


def _eager_logits(model):
    return lambda inputs: model(**inputs).logits


def texts_per_pass(worst: float) -> int | None:
    """What a runtime's load check concludes from the largest difference between
    the probe texts scored alone and batched: None (any number of texts per
    pass) within BATCH_INVARIANCE_TOLERANCE, else 1, with a warning."""
    if worst <= BATCH_INVARIANCE_TOLERANCE:
        return None
    log.warning("this model's scores depend on the batch (by up to %.3g on the load check): scoring one text "
                "per pass", worst)
    return 1


class SequenceClassifier:
    encodes_when_counting = False  # tokenize() tokenizes the batch: keep it off the event loop

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.info: ModelInfo | None = None
        self._logits = None  # inputs -> logits: the eager model or its traced graph
        self._tokenizer = None
        self._labels: tuple[str, ...] = ()
        self._threads = 1
        self._tuned = threading.local()  # .done: torch's thread count is set in this thread

    def load(self) -> ModelInfo:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a service's log is not a terminal

        cfg = self.config
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model device {device!r} was asked for but torch sees no CUDA device")
        lanes, self._threads = plan_lanes(device, cfg.lanes, cfg.threads)
        torch.set_num_threads(self._threads)
        self._tuned.done = True

        local = pathlib.Path(cfg.source).expanduser()
        source = str(local) if local.exists() else cfg.source
        if not local.exists() and cfg.source.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"model directory {cfg.source!r} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(source)
        except OSError as exc:
            # transformers says "couldn't connect to huggingface.co" for a hub id
            # with no hub reachable; name the model and the way out instead.
            raise RuntimeError(
                f"cannot load model {cfg.source!r}: not a checkpoint directory here, and the model hub "
                f"did not provide it ({exc.__class__.__name__}). Give a local checkpoint directory."
            ) from exc
        model.eval()
        id2label = model.config.id2label
        labels = tuple(str(id2label[i]) for i in range(len(id2label)))
        fingerprint_src = _fingerprint_source(model, labels, tokenizer)

        dtype = "float32"
        quantize = cfg.quantize
        if quantize is None:  # auto: where the checkpoint's build showed int8 costs at most a point of accuracy
            quantize = device == "cpu" and int8_is_safe(local)
        elif quantize and device != "cpu":
            raise RuntimeError("int8 dynamic quantization runs on the CPU only; use --quantize off or --device cpu")
        if quantize:
            model = quantize_int8(model)
            dtype = "int8-dynamic"
        fingerprint_src.update(INT8_DYNAMIC_PASS if quantize else dtype.encode())
        model.to(device)

        model_id = getattr(model.config, "tiergate_model_id", None) or (local.name if local.exists() else cfg.source)
        self._tokenizer, self._labels, self._device = tokenizer, labels, device
        self._max_texts = 1 if quantize else None
        self._logits = _eager_logits(model)
        graph = "eager"
        if cfg.torchscript or (cfg.torchscript is None and device == "cpu"):
            from inference.torchscript import trace_logits

            loss_filter = _DropLossTypeWarning()
            hf_model_log = logging.getLogger("transformers.modeling_utils")
            hf_model_log.addFilter(loss_filter)
            try:
                traced, why_not = trace_logits(model, self.tokenize, device, self._max_texts)
            finally:
                hf_model_log.removeFilter(loss_filter)
            if traced is not None:
                self._logits, graph = traced, "torchscript"
            elif cfg.torchscript:
                raise RuntimeError(f"--torchscript on: {why_not}; use --torchscript off")
            else:
                log.warning("serving the model without TorchScript: %s", why_not)
        del model  # self._logits holds what serves it
        if self._max_texts is None:
            self._max_texts = self._check_batch_invariance()
        # The float32 model quantization replaced sits in reference cycles
        # until the collector runs: free it now, then hand its pages back, so
        # that the trim ceiling below starts from what serving really holds.
        gc.collect()
        release_freed_memory()
        self._rss_ceiling = resident_bytes() + self.config.memory_headroom_mb * 1024 * 1024
        self.info = ModelInfo(model_id, labels, fingerprint_src.hexdigest()[:16], device, dtype, lanes, self._threads,
                              graph, self._max_texts)
        log.info("loaded model %s (%s, %s, %s, %d lane(s) of %d thread(s), %s per pass) fingerprint %s",
                 model_id, device, dtype, graph, lanes, self._threads,
                 "any number of texts" if self._max_texts is None else f"at most {self._max_texts} text(s)",
                 self.info.fingerprint)
        return self.info

    def _check_batch_invariance(self) -> int | None:
        """None when the probe texts score the same alone as in one padded
        batch (within BATCH_INVARIANCE_TOLERANCE), else 1: one text per pass.

        float32 on a CPU passes by a wide margin; this catches a device or
        kernel whose answers depend on the batch, before any is cached."""
        import torch

        from inference.probes import PROBE_TEXTS

        together = self._probabilities(self.tokenize(PROBE_TEXTS))
        alone = torch.cat([self._probabilities(self.tokenize([text])) for text in PROBE_TEXTS])
        return texts_per_pass((together - alone).abs().max().item())

    def count_tokens(self, text: str) -> int:
        """The tokens of one text in a pass (truncated as served): the batcher
        groups by it. Nothing is kept: tokenize() encodes the batch again."""
        return len(self._tokenizer(text, truncation=True, max_length=self.config.max_length)["input_ids"])

    def drop_counted(self) -> None:
        """Nothing to forget (count_tokens keeps nothing); as OnnxClassifier.drop_counted."""

    def tokenize(self, texts: list[str]):
        return self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )

    def forward(self, encoded) -> list[tuple[str, float]]:
        """Scores one tokenized pass; refuses more texts than the model's answers allow in one pass."""
        import torch

        rows = len(encoded["input_ids"])
        if self._max_texts is not None and rows > self._max_texts:
            raise ValueError(f"a pass of {rows} texts for a model whose answers depend on the batch beyond "
                             f"{self._max_texts} text(s) per pass; score() splits texts as needed")
        if not getattr(self._tuned, "done", False):
            # torch's thread count is a per-thread OpenMP setting: a lane's
            # thread would otherwise use one thread per core, and lanes side
            # by side would oversubscribe the cores. (Even with one lane,
            # setting it here made int8 passes ~15% faster on 2 cores; and a
            # lone pass on all cores, as at idle, was no faster than on one:
            # single misses at idle, p50 39 vs 28 ms through the stack.)
            torch.set_num_threads(self._threads)
            _lower_thread_priority(self.config.nice)  # torch's own threads, started from here, inherit it
            self._tuned.done = True
        scores, idx = self._probabilities(encoded).max(dim=-1)
        results = [(self._labels[i], s) for i, s in zip(idx.tolist(), scores.tolist())]
        # glibc keeps the heap that forward passes of varying shapes fragment
        # (measured, 2 lanes, batches of 8: 520 MB after loading, 734 MB after
        # 1,600 texts). Each trim costs the pages it hands back in page faults
        # later: a headroom of 64 MB cost ~25% throughput, 128 MB ~5% (peak 648 MB).
        if resident_bytes() > self._rss_ceiling:
            release_freed_memory()
        return results

    def _probabilities(self, encoded):
        import torch

        with torch.inference_mode():
            inputs = {k: v.to(self._device) for k, v in encoded.items()}
            return torch.softmax(self._logits(inputs).float(), dim=-1)

    def score(self, texts: list[str]) -> list[tuple[str, float]]:
        """Scores texts in passes of as many as the model's answers allow (one at a time for int8-dynamic)."""
        if self._logits is None:
            raise RuntimeError("SequenceClassifier.score() called before load()")
        step = self._max_texts or max(1, len(texts))
        return [result for start in range(0, len(texts), step)
                for result in self.forward(self.tokenize(texts[start : start + step]))]

