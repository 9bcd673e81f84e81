"""Probe texts every runtime's load checks run on. Light: no torch."""

from __future__ import annotations

__all__ = ["PROBES", "PROBE_TEXTS"]

# Batches of texts of 1 to 256 tokens, including one the tokenizer truncates.
PROBES = [
    ["ok"],
    ["one text alone, a little longer than the shortest"],
    ["three texts", "of quite different lengths, the second one being the longest of all three here", "x"],
    ["a long text that the tokenizer truncates at max_length: " + "word " * 400, "and a short one"],
    [f"text number {i} of a larger batch" for i in range(9)],
]
# Scored alone and in one padded batch to check that a model's answers do not depend on the batch.
PROBE_TEXTS = [text for probe in PROBES for text in probe]
