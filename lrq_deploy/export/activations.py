"""Per-token activation quantization in standard ONNX ops: the reference arithmetic
(quant/primitives.py) node by node, shared by the standard and the integer lowerings."""

from __future__ import annotations

import numpy as np
from onnx import helper

from lrq_deploy.export.graph import Graph


def activation_codes(graph: Graph, prefix: str, x: str, bits: int, asym: bool = False) -> tuple[list, str, str, str | None]:
    """Per-token quantization, the reference arithmetic in standard ops: (nodes, codes as float
    integers, scale [..., 1], zero point [..., 1] or None). Symmetric codes lie in [-qmax, qmax];
    asymmetric ones in [0, 2^b - 1] with the zero point round(-min(x, 0) / scale)."""
    c = lambda n, v: graph.const(f"{prefix}.{n}", np.array(v, dtype=np.float32))  # noqa: E731
    axes = graph.const(f"{prefix}.axes", np.array([-1], dtype=np.int64))
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{prefix}.{out}"], name=f"{prefix}.{out}", **kw)  # noqa: E731
    if not asym:
        qmax = float(2 ** (bits - 1) - 1)
        nodes = [
            n("Abs", [x], "abs"),
            n("ReduceMax", [f"{prefix}.abs", axes], "amax", keepdims=1),
            n("Max", [f"{prefix}.amax", c("eps", 1e-5)], "amax_clamped"),
            n("Div", [f"{prefix}.amax_clamped", c("qmax", qmax)], "scale"),
            n("Div", [x, f"{prefix}.scale"], "scaled"),
            n("Round", [f"{prefix}.scaled"], "rounded"),
            n("Clip", [f"{prefix}.rounded", c("lo", -qmax), c("hi", qmax)], "q"),
        ]
        return nodes, f"{prefix}.q", f"{prefix}.scale", None
    levels = float(2**bits - 1)
    nodes = [
        n("ReduceMax", [x, axes], "xmax", keepdims=1),
        n("Max", [f"{prefix}.xmax", c("zero_f", 0.0)], "hi"),
        n("ReduceMin", [x, axes], "xmin", keepdims=1),
        n("Min", [f"{prefix}.xmin", f"{prefix}.zero_f"], "lo"),
        n("Sub", [f"{prefix}.hi", f"{prefix}.lo"], "range"),
        n("Max", [f"{prefix}.range", c("eps", 1e-5)], "range_clamped"),
        n("Div", [f"{prefix}.range_clamped", c("levels", levels)], "scale"),
        n("Neg", [f"{prefix}.lo"], "neg_lo"),
        n("Div", [f"{prefix}.neg_lo", f"{prefix}.scale"], "zero_scaled"),
        n("Round", [f"{prefix}.zero_scaled"], "zero"),
        n("Div", [x, f"{prefix}.scale"], "scaled"),
        n("Round", [f"{prefix}.scaled"], "rounded"),
        n("Add", [f"{prefix}.rounded", f"{prefix}.zero"], "shifted"),
        n("Clip", [f"{prefix}.shifted", f"{prefix}.zero_f", c("levels_hi", levels)], "q"),
    ]
    return nodes, f"{prefix}.q", f"{prefix}.scale", f"{prefix}.zero"


def activation_quant(graph: Graph, prefix: str, x: str, bits: int, asym: bool = False) -> tuple[list, str]:
    """Per-token fake quantization: the codes scaled back to float ((q - z) * s when asymmetric)."""
    nodes, codes, scale, zero = activation_codes(graph, prefix, x, bits, asym)
    if zero is not None:
        nodes.append(helper.make_node("Sub", [codes, zero], [f"{prefix}.centred"], name=f"{prefix}.centred"))
        codes = f"{prefix}.centred"
    nodes.append(helper.make_node("Mul", [codes, scale], [f"{prefix}.xq"], name=f"{prefix}.xq"))
    return nodes, f"{prefix}.xq"
