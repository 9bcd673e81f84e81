"""The int8 graph for onnxruntime: every encoder MatMul in int8, each token's activations on a scale of its own.

Runs inside the export process (inference.onnx_export) on the float32 graph.

Why a scale per token: dynamic int8 (torch's, onnxruntime's) takes one
activation scale per tensor from the whole pass, so a text's answer depends
on what else shares its batch. Fixed scales calibrated at export do not, but
a few tokens of every text carry activations far above the rest, which one
fixed scale per tensor cannot hold: measured on the default model (800
standard-library docstrings unlike its training tweets), static QDQ kept 95%
of float32's labels, 95% with SmoothQuant (alpha 0.5-0.8) first, 98.25% only
with the FFN's output projection left in float32. A scale taken from each
token's own row (max |x| / 127) follows those tokens and uses nothing but the
token itself, so a text's answer is a function of the text alone, in any
batch and beside any padding (checked at export and at load). With 8-bit
weights (one scale per output channel) it kept 98.7% of the labels and lost
0.3 points of held-out accuracy, at 2.35x float32's speed on one AVX-512 VNNI
core; with 7-bit weights 97.25%.

Why 7 bits without VNNI: there onnxruntime multiplies u8 x s8 with
VPMADDUBSW, which saturates when two adjacent products exceed int16; 7-bit
weights cannot reach it. With VNNI (VPDPBUSD) the full 8 bits are exact. The
graph is therefore specific to the kind of CPU it was built on, which its
manifest records (inference.onnx_model re-exports on another kind).

The pooler and the classifier stay float32 (a single row per text each: a negligible share of the work).
"""

from __future__ import annotations

import pathlib

__all__ = ["RECIPE_VERSION", "Int8Unavailable", "cpu_has_vnni", "recipe", "quantize_per_token"]

RECIPE_VERSION = 2


class Int8Unavailable(RuntimeError):
    """No int8 graph for this model (the message says why)."""


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 without saturating (AVX-512 VNNI or AVX-VNNI), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def recipe(weight_bits: int) -> str:
    """What decides the int8 graph's answers besides the weights: hashed into the fingerprint."""
    return (f"int8 v{RECIPE_VERSION}: per-token u8 activations (QuantizeLinear per row, max|x|/127, zero point 128), "
            f"per-channel s{weight_bits} weights, encoder MatMuls; pooler and classifier float32")


def _weight_matmuls(graph) -> list:
    """The MatMul nodes whose second input is a weight, outside the pooler and the classifier."""
    weights = {init.name for init in graph.initializer}
    return [node for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in weights
            and "pooler" not in node.name and "classifier" not in node.name]


def quantize_per_token(graph_path: pathlib.Path, out: pathlib.Path, weight_bits: int) -> int:
    """Writes the int8 graph of the float32 `graph_path` to `out`; returns how many MatMuls it quantized.

    Each MatMul x @ W becomes, on x seen as rows of [tokens, features]:
    s = max|x_row| / 127 per row; q = QuantizeLinear(x, s, 128) per row (one
    pass; 10% faster than Mul, Round, Add and Cast); MatMulIntegerToFloat(q,
    W8, 1, W8's per-column scales, 128), times s, reshaped back. MatMuls that
    read the same tensor (query, key, value) share one quantization of it.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    model = onnx.load(str(graph_path))
    graph = model.graph
    targets = _weight_matmuls(graph)
    if not targets:
        raise Int8Unavailable("the graph has no weight MatMuls to quantize")
    weights = {init.name: init for init in graph.initializer}
    w_max = 2 ** (weight_bits - 1) - 1
    constants = {"127": np.array(127.0, np.float32), "eps": np.array(1e-30, np.float32),
                 "zp": np.array(128, np.uint8), "1": np.array(1.0, np.float32),
                 "axis1": np.array([1], np.int64), "start0": np.array([0], np.int64), "end-1": np.array([-1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, f"int8_{k}") for k, v in constants.items())
    c = {k: f"int8_{k}" for k in constants}

    quantized: dict[str, tuple[str, str, str]] = {}  # input tensor -> (uint8 rows, row scales, leading dims)
    replacement: dict[int, list] = {}  # id() of a node -> the nodes that replace it (names may repeat or be empty)
    for number, node in enumerate(targets):
        x, w_name = node.input
        p = f"int8_{number}_" + node.name.strip("/").replace("/", "_")
        new = []
        w = numpy_helper.to_array(weights[w_name]).astype(np.float32)  # [in, out]
        if x not in quantized:
            # Rows of [tokens, features]: QuantizeLinear with one scale per row
            # (axis 0) quantizes each token on its own scale in one pass.
            q = f"{p}_q"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, w.shape[0]], np.int64), q + "_2d"))
            new += [
                helper.make_node("Reshape", [x, q + "_2d"], [q + "_x2"], name=q + "_Rows"),
                helper.make_node("Abs", [q + "_x2"], [q + "_abs"], name=q + "_Abs"),
                helper.make_node("ReduceMax", [q + "_abs"], [q + "_max"], name=q + "_RowMax", axes=[1], keepdims=0),
                helper.make_node("Max", [q + "_max", c["eps"]], [q + "_maxf"], name=q + "_Floor"),
                helper.make_node("Div", [q + "_maxf", c["127"]], [q + "_s"], name=q + "_Scale"),
                helper.make_node("Shape", [q + "_s"], [q + "_n"], name=q + "_Count"),
                helper.make_node("ConstantOfShape", [q + "_n"], [q + "_zp"], name=q + "_ZeroPoints",
                                 value=numpy_helper.from_array(np.array([128], np.uint8))),
                helper.make_node("QuantizeLinear", [q + "_x2", q + "_s", q + "_zp"], [q + "_u8"], name=q + "_U8", axis=0),
                helper.make_node("Unsqueeze", [q + "_s", c["axis1"]], [q + "_s2"], name=q + "_ScaleColumn"),
                helper.make_node("Shape", [x], [q + "_shape"], name=q + "_Shape"),
                helper.make_node("Slice", [q + "_shape", c["start0"], c["end-1"]], [q + "_lead"], name=q + "_Lead"),
            ]
            quantized[x] = (q + "_u8", q + "_s2", q + "_lead")
        u8, row_scale, lead = quantized[x]
        col_scale = (np.maximum(np.abs(w).max(axis=0), 1e-30) / w_max).astype(np.float32)
        w8 = np.clip(np.round(w / col_scale), -w_max, w_max).astype(np.int8)
        graph.initializer.extend([numpy_helper.from_array(w8, p + "_w8"), numpy_helper.from_array(col_scale, p + "_ws")])
        new += [
            helper.make_node("MatMulIntegerToFloat", [u8, p + "_w8", c["1"], p + "_ws", c["zp"]], [p + "_cols"],
                             name=p + "_MatMulIntegerToFloat", domain="com.microsoft"),
            helper.make_node("Mul", [p + "_cols", row_scale], [p + "_rows"], name=p + "_RowScale"),
            helper.make_node("Concat", [lead, p + "_n"], [p + "_shape"], name=p + "_OutShape", axis=0),
            helper.make_node("Reshape", [p + "_rows", p + "_shape"], [node.output[0]], name=p + "_Out"),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1]], np.int64), p + "_n"))
        replacement[id(node)] = new
    nodes = [n for node in graph.node for n in replacement.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]  # the float32 weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out))
    return len(targets)
