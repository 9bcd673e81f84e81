"""The model's forward pass as a frozen TorchScript graph, checked against the eager model.

Lanes run forward passes side by side in one process, but a transformers
model's Python code (building the attention mask, calling each module) holds
the GIL, so the lanes queue on it between kernels. A traced, frozen graph runs
without the GIL. Measured with the default int8 model, 2 lanes of 1 thread on
2 cores, batches of 4: 116-136 texts/s traced vs 91-106 eager, with the same
logits.

Tracing records one run's control flow. Whatever of it depends on shapes is
checked before the graph is used: on probe batches of other sizes and lengths
than the traced one (one word, padding, truncation at max_length), cut into
passes as the service cuts them (one text per pass for int8-dynamic), it must
give the eager model's logits, or the eager model is served and the log says why.
Only this module imports torch for it; the gateway never loads it.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from inference.probes import PROBE_TEXTS, PROBES

__all__ = ["trace_logits", "TracedLogits", "PROBE_TEXTS"]

# Tracing example: two texts of different lengths, so the padding path is what gets recorded.
_EXAMPLE = ["a short text", "a somewhat longer text, so that the batch holds some padding for the mask"]
MAX_LOGIT_DIFF = 1e-3  # well above float rounding between two runs of the same kernels, far below a label flip


class TracedLogits:
    """Calls a traced graph with the tokenizer's outputs; returns logits like model(**inputs).logits."""

    def __init__(self, graph, input_names: tuple[str, ...]) -> None:
        self._graph = graph
        self._input_names = input_names

    def __call__(self, inputs: dict) -> torch.Tensor:
        return self._graph(*(inputs[name] for name in self._input_names))


class _LogitsOnly(torch.nn.Module):
    """The model with positional tensor inputs and a tensor output, as tracing needs."""

    def __init__(self, model, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors)), return_dict=False)[0]


def trace_logits(model, tokenize: Callable[[list[str]], dict], device: str,
                 max_texts_per_pass: int | None = None) -> tuple[TracedLogits | None, str]:
    """(the traced model, "") when it matches the eager model on every probe, else (None, why not).

    `tokenize` is the serving tokenizer call (padding, truncation at max_length);
    probes are scored in passes of at most `max_texts_per_pass` texts (None: any),
    as the service will score texts."""

    def encode(texts: list[str]) -> dict:
        return {name: tensor.to(device) for name, tensor in tokenize(texts).items()}

    example = encode(_EXAMPLE)
    input_names = tuple(example)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # TracerWarnings name every shape-dependent Python branch; the
            # probes below check what those branches recorded instead.
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(_LogitsOnly(model, input_names).eval(),
                                    tuple(example[name] for name in input_names), check_trace=False)
            graph = torch.jit.freeze(graph)
    except Exception as exc:  # any model tracing cannot handle: serve it eagerly
        return None, f"tracing failed ({exc.__class__.__name__}: {str(exc)[:200]})"
    traced = TracedLogits(graph, input_names)
    step = max_texts_per_pass or max(map(len, PROBES))
    passes = [probe[i : i + step] for probe in PROBES for i in range(0, len(probe), step)]
    with torch.inference_mode():
        for probe in passes:
            inputs = encode(probe)
            want = model(**inputs).logits
            try:
                got = traced(inputs)
            except Exception as exc:
                return None, f"the traced graph failed on a batch of {len(probe)} ({exc.__class__.__name__})"
            if got.shape != want.shape:
                return None, f"the traced graph gave logits of shape {tuple(got.shape)}, not {tuple(want.shape)}"
            diff = (got.float() - want.float()).abs().max().item()
            if diff > MAX_LOGIT_DIFF:
                return None, f"the traced graph's logits differ from the model's by {diff:.3g} on a batch of {len(probe)}"
    return traced, ""
