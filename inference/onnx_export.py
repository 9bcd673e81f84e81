"""Exports a checkpoint to an ONNX graph for the onnxruntime runtime, once, and checks it.

    python -m inference.onnx_export --model DIR --out DIR [--max-length 256] [--precision float32|int8]

Runs in a process of its own (the inference service starts it when the graph
is missing or stale), because it needs torch and transformers, which the
serving process then never imports. The graph is exported with eager
attention (with `sdpa` the graph is no faster), then checked before it is
kept: on the probe texts, the fast tokenizer the service uses must give the
same token ids as transformers' tokenizer, and onnxruntime's probabilities
must match torch's within CHECK_TOLERANCE with the same labels. The manifest
next to the graph carries what the service needs (labels, model id, the
fingerprint of the weights) and the checkpoint's file signature, so a changed
checkpoint is exported again.

With --precision int8 the float32 graph is quantized (inference.onnx_int8)
and measured against it before it is kept: label agreement on
standard-library docstrings (inference.reference_texts), held-out accuracy
next to float32's for a model tiergate built, both graphs' speed on one of
this machine's cores, and the largest difference between a text scored alone
and in padded batches, which must be within BATCH_INVARIANCE_TOLERANCE or
nothing is kept. The manifest records
the figures; the service decides from them whether `--quantize auto` serves
the graph (inference.onnx_model).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

from inference.model_record import checkpoint_signature
from inference.probes import PROBE_TEXTS

__all__ = ["export", "softmax", "MANIFEST", "GRAPH", "VERSION", "CHECK_TOLERANCE", "PRECISIONS", "RUNTIME_TAGS"]

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
VERSION = 1
CHECK_TOLERANCE = 1e-4      # probabilities, onnxruntime vs torch: float32 rounding is ~1e-6
PRECISIONS = ("float32", "int8")
# Hashed into the fingerprint: another runtime's answers differ in the last
# bits. The int8 graph's recipe (its weight bits among it) is hashed too.
RUNTIME_TAGS = {"float32": b"onnxruntime-float32", "int8": b"onnxruntime-int8-per-token"}
# The int8 check: docstring paragraphs, and texts of several joined, it is measured on.
AGREEMENT_TEXTS, AGREEMENT_LONG_TEXTS = 800, 40


def export(checkpoint: pathlib.Path, out: pathlib.Path, max_length: int, precision: str = "float32") -> dict:
    import onnxruntime
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from inference.model import _fingerprint_source

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    hf_logging.set_verbosity_error()
    if precision == "int8":
        from inference.reference_texts import reference_texts

        texts = reference_texts(AGREEMENT_TEXTS, AGREEMENT_LONG_TEXTS)  # first: without them nothing can be checked
    if not (checkpoint / "tokenizer.json").is_file():
        raise RuntimeError(f"{checkpoint} has no tokenizer.json (a fast tokenizer), which the onnxruntime runtime needs")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    labels = tuple(str(model.config.id2label[i]) for i in range(len(model.config.id2label)))
    digest = _fingerprint_source(model, labels, hf_tokenizer)
    digest.update(RUNTIME_TAGS[precision])
    inputs = list(hf_tokenizer(["probe"], return_tensors="pt").keys())

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        _export_graph(model, hf_tokenizer, inputs, tmp / GRAPH)
        session = onnxruntime.InferenceSession(str(tmp / GRAPH), providers=["CPUExecutionProvider"])
        fast = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        fast.no_padding()
        fast.enable_truncation(max_length)
        worst = 0.0
        for text in PROBE_TEXTS:
            enc = hf_tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            if fast.encode(text).ids != enc["input_ids"][0].tolist():
                raise RuntimeError("the fast tokenizer (tokenizer.json) and transformers' tokenizer disagree on "
                                   f"{text[:40]!r}")
            with torch.no_grad():
                want = torch.softmax(model(**enc).logits.float(), dim=-1).numpy()
            got = softmax(session.run(["logits"], _feed(enc, inputs))[0])
            worst = max(worst, float(abs(got - want).max()))
            if got.argmax() != want.argmax() or worst > CHECK_TOLERANCE:
                raise RuntimeError(f"the exported graph's answers differ from the model's by {worst:.3g} on the "
                                   "probe texts")
        check = {"texts": len(PROBE_TEXTS), "max_diff": worst}
        if precision == "int8":
            del session
            check |= _export_int8(checkpoint, inputs, hf_tokenizer, max_length, tmp, texts)
            digest.update(check["recipe"].encode())
        manifest = {
            "version": VERSION, "files": checkpoint_signature(checkpoint), "labels": list(labels),
            "model_id": getattr(model.config, "tiergate_model_id", None) or checkpoint.name,
            "fingerprint": digest.hexdigest()[:16], "inputs": inputs, "max_length": max_length,
            "pad_id": hf_tokenizer.pad_token_id or 0, "precision": precision, "check": check,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _export_graph(model, hf_tokenizer, inputs: list[str], path: pathlib.Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(inputs, args)), return_dict=False)[0]

    example = hf_tokenizer(["a short text", "a somewhat longer text, so that the batch holds some padding"],
                           padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs} | {"logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches: the graph is checked below
        torch.onnx.export(Logits(model).eval(), tuple(example[n] for n in inputs), str(path),
                          input_names=inputs, output_names=["logits"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)


def _feed(encoded, inputs: list[str]) -> dict:
    import numpy as np

    return {name: np.asarray(encoded[name], dtype=np.int64) for name in inputs}


def softmax(logits):
    import numpy as np

    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _export_int8(checkpoint: pathlib.Path, inputs, hf_tokenizer, max_length: int, tmp: pathlib.Path,
                 texts: list[str]) -> dict:
    """Replaces tmp/GRAPH (float32) by its int8 graph; returns the figures the manifest keeps."""
    from inference.build import held_out_of_build
    from inference.model import BATCH_INVARIANCE_TOLERANCE
    from inference.onnx_int8 import cpu_has_vnni, quantize_per_token, recipe

    bits = 8 if cpu_has_vnni() else 7
    quantize_per_token(tmp / GRAPH, tmp / "int8.onnx", bits)
    reference, int8 = _session(tmp / GRAPH), _session(tmp / "int8.onnx")

    def score(session, texts, per_pass=4):
        return _score_sorted(session, hf_tokenizer, inputs, texts, per_pass, max_length)

    want, got = score(reference, texts), score(int8, texts)
    some = texts[:: max(1, len(texts) // 200)] + PROBE_TEXTS
    batch_diff = float(abs(score(int8, some, per_pass=1) - score(int8, some, per_pass=7)).max())
    if batch_diff > BATCH_INVARIANCE_TOLERANCE:
        raise RuntimeError(f"the int8 graph's answers depend on the batch (by up to {batch_diff:.3g})")
    figures = {
        "recipe": recipe(bits), "weight_bits": bits,
        "agreement": float((want.argmax(axis=-1) == got.argmax(axis=-1)).mean()), "agreement_texts": len(texts),
        "agreement_max_diff": float(abs(want - got).max()), "batch_diff": batch_diff,
    }
    held_out = held_out_of_build(checkpoint)  # of a model tiergate built, else None
    if held_out:
        truth = [label for _, label in held_out]
        for name, session in (("accuracy_float32", reference), ("accuracy", int8)):
            predicted = score(session, [text for text, _ in held_out]).argmax(axis=-1)
            figures[name] = float((predicted == truth).mean())
        figures["accuracy_texts"] = len(held_out)
    figures["texts_per_s"] = {name: _speed(session, hf_tokenizer, inputs, texts[:256], max_length)
                              for name, session in (("float32", reference), ("int8", int8))}
    del reference, int8
    os.replace(tmp / "int8.onnx", tmp / GRAPH)
    return figures


def _session(path: pathlib.Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # as one lane serves it
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _score_sorted(session, hf_tokenizer, inputs, texts: list[str], per_pass: int, max_length: int):
    """Probabilities of every text, scored as the service scores them: in
    length-sorted passes of `per_pass`, padded to the longest."""
    import numpy as np

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), per_pass):
        rows = order[start : start + per_pass]
        enc = hf_tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                           return_tensors="np")
        probabilities = softmax(session.run(["logits"], _feed(enc, inputs))[0])
        for row, i in enumerate(rows):
            out[i] = probabilities[row]
    return np.stack(out)


def _speed(session, hf_tokenizer, inputs, texts: list[str], max_length: int) -> float:
    """Texts/s of one thread in passes of 4, best of three runs (the model's own speed here)."""
    _score_sorted(session, hf_tokenizer, inputs, texts[:16], 4, max_length)  # warm-up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        _score_sorted(session, hf_tokenizer, inputs, texts, 4, max_length)
        best = min(best, time.perf_counter() - started)
    return round(len(texts) / best, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.onnx_export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="directory for the graph and its manifest (replaced)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", choices=PRECISIONS, default="float32")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = export(pathlib.Path(args.model), out, args.max_length, args.precision)
    except Exception as exc:  # one line for the service to show
        print(f"export failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(manifest["check"]))


if __name__ == "__main__":
    main()
