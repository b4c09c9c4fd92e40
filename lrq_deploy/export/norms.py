"""RMSNorm spelled the way onnxruntime recognises it (target ort).

torch exports RMSNorm as x * rsqrt(mean(x^2) + eps): Pow, ReduceMean, Add, Sqrt, Reciprocal,
Mul, Mul. onnxruntime's SimplifiedLayerNormalization fusion looks for the division form,
x / sqrt(mean(x^2) + eps), and leaves the reciprocal form as six kernels per norm. Rewriting
Mul(x, Reciprocal(Sqrt(v))) as Div(x, Sqrt(v)) lets it fuse every norm into one kernel; the graph
stays standard ONNX. Not bit-identical: x / s rounds once where x * (1 / s) rounds twice (a
difference of an ulp of the normalised value, far inside the verification tolerance).
"""

from __future__ import annotations

import onnx
from onnx import helper

from lrq_deploy.export.graph import MICROSOFT, consumers, producers, set_nodes


def norms_as_division(model: onnx.ModelProto) -> int:
    """Rewrite every Mul(x, Reciprocal(Sqrt(v))) as Div(x, Sqrt(v)); returns how many norms
    were rewritten (a Reciprocal with any other consumer is left as it is)."""
    producer, readers = producers(model), consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    rewrites: dict[str, onnx.NodeProto] = {}
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Reciprocal" or node.output[0] in graph_outputs:
            continue
        source = producer.get(node.input[0])
        users = readers[node.output[0]]
        if source is None or source.op_type != "Sqrt" or not users or any(u.op_type != "Mul" for u in users):
            continue
        for mul in users:
            other = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
            rewrites[mul.output[0]] = helper.make_node("Div", [other, node.input[0]], list(mul.output), name=mul.name)
        dropped.add(node.output[0])
    if not dropped:
        return 0
    set_nodes(model, [rewrites.get(n.output[0], n) for n in model.graph.node if n.output[0] not in dropped])
    return len(dropped)


def residual_norms_as_contrib(model: onnx.ModelProto) -> int:
    """Where a residual Add feeds an RMSNorm in division form (after norms_as_division), replace
    both by one com.microsoft.SkipSimplifiedLayerNormalization (sum and norm in one kernel, the
    sum still an output for the next residual); returns how many were replaced. onnxruntime's
    own fusion of this pattern needs shapes it cannot always infer in these graphs."""
    graph = model.graph
    producer, readers = producers(model), consumers(model)
    constants = {t.name: t for t in graph.initializer}
    replaced: dict[str, onnx.NodeProto] = {}  # output[0] of the norm's final Mul -> the fused node
    removed: set[str] = set()  # output[0] of the nodes folded into it
    for add in graph.node:
        chain = _rms_norm_chain(add, readers, constants) if add.op_type == "Add" else None
        if chain is None or any(name in constants or name not in producer for name in add.input):
            continue
        mul, weight, epsilon = chain[-1], chain[-1].input, _scalar(constants, chain[2], 1)
        gamma = weight[0] if weight[0] in constants else weight[1]
        replaced[mul.output[0]] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], gamma], [mul.output[0], "", "", add.output[0]],
            name=f"{mul.name}.skip_norm", domain=MICROSOFT, epsilon=epsilon)
        removed.update(node.output[0] for node in (add, *chain[:-1]))
    if not replaced:
        return 0
    set_nodes(model, [replaced.get(n.output[0], n) for n in graph.node if n.output[0] not in removed])
    if not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    return len(replaced)


def _rms_norm_chain(x_node, readers, constants):
    """[Pow, ReduceMean, Add, Sqrt, Div, Mul] of x / sqrt(mean(x^2, -1) + eps) * w reading
    x_node's output, or None."""
    x = x_node.output[0]
    users = readers[x]
    pow_ = next((u for u in users if u.op_type == "Pow" and u.input[0] == x and _scalar(constants, u, 1) == 2.0), None)
    if pow_ is None:
        return None
    chain, current = [pow_], pow_
    for op in ("ReduceMean", "Add", "Sqrt", "Div", "Mul"):
        nxt = readers[current.output[0]]
        if len(nxt) != 1 or nxt[0].op_type != op:
            return None
        current = nxt[0]
        chain.append(current)
    mean, eps_add, _, div, mul = chain[1:]
    axes = constants.get(mean.input[1]) if len(mean.input) > 1 else None
    keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    if axes is None or list(onnx.numpy_helper.to_array(axes).reshape(-1)) != [-1] or keepdims != 1:
        return None
    if div.input[0] != x or eps_add.input[0] != mean.output[0] or _scalar(constants, eps_add, 1) is None:
        return None
    if not any(name in constants and len(constants[name].dims) == 1 for name in mul.input):
        return None
    return chain


def _scalar(constants, node, index: int = 1):
    """The single float of node.input[index] when it is an initializer, else None."""
    if len(node.input) <= index or node.input[index] not in constants:
        return None
    value = onnx.numpy_helper.to_array(constants[node.input[index]]).reshape(-1)
    return float(value[0]) if value.size == 1 else None
