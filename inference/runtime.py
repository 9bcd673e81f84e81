"""Which runtime serves the model: the one place that decides (--runtime)."""

from __future__ import annotations

import logging
import os

from inference.model import ModelConfig, SequenceClassifier

__all__ = ["load_classifier", "wants_onnxruntime"]

log = logging.getLogger(__name__)


def wants_onnxruntime(config: ModelConfig) -> bool:
    """Whether to try onnxruntime: asked for, or auto on a CPU (float32 or
    int8, inference.onnx_model). torch keeps a TorchScript graph asked for
    (--torchscript on), CUDA, and int8-dynamic (--runtime torch --quantize on)."""
    if config.runtime != "auto":
        return config.runtime == "onnxruntime"
    on_cpu = config.device == "cpu" or (config.device == "auto" and not os.path.exists("/dev/nvidiactl"))
    return on_cpu and config.torchscript is not True


def load_classifier(config: ModelConfig):
    """A loaded classifier (OnnxClassifier or SequenceClassifier). Blocking:
    run it off the event loop."""
    if wants_onnxruntime(config):
        from inference.onnx_model import OnnxClassifier, OnnxUnavailable

        model = OnnxClassifier(config)
        try:
            model.load()
            return model
        except OnnxUnavailable as exc:
            if config.runtime == "onnxruntime":
                raise RuntimeError(f"--runtime onnxruntime: {exc}") from None
            log.warning("serving the model with torch: onnxruntime cannot serve it (%s)", exc)
    model = SequenceClassifier(config)
    model.load()
    return model
