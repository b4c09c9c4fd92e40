"""The ONNX form of the graph op every quantized linear becomes when exported.

The torch custom op `lrq::quant_linear` (quant/op.py) keeps one node per quantized linear
through torch.export; its ONNX translation here emits one `lrq.QuantLinear` node carrying the
packed weights, scales and zero points as inputs and the configuration as attributes.
Lowering (export/lower.py) then turns that node into standard ONNX ops (`--target ort`) or a
TensorRT plugin node (`--target trt`).
"""

from __future__ import annotations

import torch

from lrq_deploy.export import attention  # registers torch.ops.lrq.group_query_attention
from lrq_deploy.export import kv_attention  # registers torch.ops.lrq.quantized_cache_attention
from lrq_deploy.quant.op import quant_linear  # noqa: F401  (registers torch.ops.lrq.quant_linear)
from lrq_deploy.quant.scheme import ATTRIBUTES, DOMAIN

NODE_ATTRIBUTES = ATTRIBUTES + ("in_features",)


def _register_schema() -> None:
    """Declare lrq.QuantLinear to onnx so onnxscript can emit it and the checker knows it."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("QuantLinear", DOMAIN):
        return
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.AttrType.INT
    schema = OpSchema(
        "QuantLinear", DOMAIN, 1,
        doc="Quantized linear layer of lrq-deploy (lowered to standard ops or a TensorRT plugin)",
        inputs=[
            param("x", "T"), param("qweight", "TW"), param("scales", "TS"), param("zeros", "TZ"),
            param("bias", "T", param_option=optional),
        ],
        outputs=[param("y", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("TW", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "packed codes or float weight"),
            ("TS", ["tensor(float16)", "tensor(float)", "tensor(uint8)"], "scales (float, or float grids' codes)"),
            ("TZ", ["tensor(uint8)", "tensor(float)"], "zero points, or a float grid's tensor and input scales"),
        ],
        attributes=[OpSchema.Attribute(n, attr, "") for n in NODE_ATTRIBUTES],
    )
    onnx.defs.register_schema(schema)


def quant_linear_onnx(x, qweight, scales, zeros, bias, wbits: int, abits: int, group_size: int, symmetric: int,
                      act_asym: int, wformat: int, aformat: int, in_features: int):
    """ONNX translation: one node in the lrq domain (lowered later); the op's integer arguments
    are the node's attributes (NODE_ATTRIBUTES)."""
    from onnxscript.values import Opset

    _register_schema()
    lrq = Opset(DOMAIN, 1)
    inputs = [x, qweight, scales, zeros] + ([bias] if bias is not None else [])
    return lrq.QuantLinear(*inputs, wbits=wbits, abits=abits, group_size=group_size, symmetric=symmetric,
                           act_asym=act_asym, wformat=wformat, aformat=aformat, in_features=in_features)


TRANSLATIONS = {torch.ops.lrq.quant_linear.default: quant_linear_onnx, **attention.TRANSLATIONS,
                torch.ops.lrq.quantized_cache_attention.default: kv_attention.quantized_cache_attention_onnx}
