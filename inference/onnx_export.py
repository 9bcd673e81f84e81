"""Exports a checkpoint to an ONNX graph for the onnxruntime runtime, once, and checks it.

    python -m inference.onnx_export --model DIR --out DIR [--max-length 256]

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
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

from inference.model_record import checkpoint_signature
from inference.probes import PROBE_TEXTS

__all__ = ["export", "MANIFEST", "GRAPH", "VERSION", "CHECK_TOLERANCE", "RUNTIME_TAG"]

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
VERSION = 1
CHECK_TOLERANCE = 1e-4      # probabilities, onnxruntime vs torch: float32 rounding is ~1e-6
RUNTIME_TAG = b"onnxruntime-float32"  # hashed into the fingerprint: another runtime's answers differ in the last bits


def export(checkpoint: pathlib.Path, out: pathlib.Path, max_length: int) -> dict:
    import numpy as np
    import onnxruntime
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from inference.model import _fingerprint_source

    hf_logging.set_verbosity_error()
    if not (checkpoint / "tokenizer.json").is_file():
        raise RuntimeError(f"{checkpoint} has no tokenizer.json (a fast tokenizer), which the onnxruntime runtime needs")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    labels = tuple(str(model.config.id2label[i]) for i in range(len(model.config.id2label)))
    digest = _fingerprint_source(model, labels, hf_tokenizer)
    digest.update(RUNTIME_TAG)
    inputs = list(hf_tokenizer(["probe"], return_tensors="pt").keys())

    class Logits(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(inputs, args)), return_dict=False)[0]

    example = hf_tokenizer(["a short text", "a somewhat longer text, so that the batch holds some padding"],
                           padding=True, return_tensors="pt")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        axes = {name: {0: "batch", 1: "sequence"} for name in inputs} | {"logits": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(Logits(model).eval(), tuple(example[n] for n in inputs), str(tmp / GRAPH),
                              input_names=inputs, output_names=["logits"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
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
            logits = session.run(["logits"], {n: enc[n].numpy().astype(np.int64) for n in inputs})[0]
            got = np.exp(logits - logits.max(axis=-1, keepdims=True))
            got /= got.sum(axis=-1, keepdims=True)
            worst = max(worst, float(np.abs(got - want).max()))
            if got.argmax() != want.argmax() or worst > CHECK_TOLERANCE:
                raise RuntimeError(f"the exported graph's answers differ from the model's by {worst:.3g} on the "
                                   "probe texts")
        manifest = {
            "version": VERSION, "files": checkpoint_signature(checkpoint), "labels": list(labels),
            "model_id": getattr(model.config, "tiergate_model_id", None) or checkpoint.name,
            "fingerprint": digest.hexdigest()[:16], "inputs": inputs, "max_length": max_length,
            "pad_id": hf_tokenizer.pad_token_id or 0, "check": {"texts": len(PROBE_TEXTS), "max_diff": worst},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.onnx_export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="directory for the graph and its manifest (replaced)")
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = export(pathlib.Path(args.model), out, args.max_length)
    except Exception as exc:  # one line for the service to show
        print(f"export failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(manifest["check"]))


if __name__ == "__main__":
    main()
