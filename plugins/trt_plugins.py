"""TensorRT plugins for the `lrq`-domain nodes that `lrq export --target trt` writes.

One IPluginV3 class serves every node type (W2A16Linear, W3A16Linear, W4A16Linear,
W4A4Linear): the node's attributes pick the Triton kernel. Both TensorRT flavours have the
same Python plugin interface, so the classes are made for whichever module is passed in.

- Build: shape and type rules come from `aot.py` (plain Python, tested without TensorRT);
  the inputs are the activations, the packed weights [N, K / per_byte], float16 scales and
  zero points [N, groups], and an optional bias. Weights and zero points are uint8 bytes
  carried as INT8 tensors (TensorRT widens UINT8 constants to INT32).
- Run: `enqueue` wraps TensorRT's device pointers as torch tensors and calls the kernel's
  torch op on TensorRT's stream. The engine therefore runs in a Python process that has
  called `register_plugins` (TensorRT for RTX has no ahead-of-time plugin interface).
"""

from __future__ import annotations

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import ATTRIBUTES, DOMAIN, LAYER_ATTRIBUTES, QuantScheme, kernel_schemes, layer_attributes

from . import aot

NAMESPACE = DOMAIN
VERSION = "1"
PLUGIN_NAMES = tuple(QuantScheme(w, a).plugin_name for w, a in kernel_schemes())
# The plugin's serialized fields, in the order engines store them (built engines keep this order:
# it is part of their bytes): the scheme's attributes and the layer's shape. The number formats are
# not among them: plugins serve integer grids only (float grids are TensorRT's own Q/DQ layers).
FIELDS = ("wbits", "abits", "group_size", "in_features", "out_features", "symmetric", "act_asym")
assert sorted(FIELDS) == sorted(set(ATTRIBUTES + LAYER_ATTRIBUTES) - {"wformat", "aformat"})

_registered: dict[tuple[str, str], object] = {}  # (module, plugin) -> creator; TensorRT keeps raw pointers


def required_attributes(attrs: dict, owner: str = "lrq plugin node") -> dict:
    """The plugin's integer attributes out of `attrs`, defaults filled in; one clear error names
    any that are missing."""
    scheme, in_features, out_features = layer_attributes(attrs, owner)
    values = {**scheme.to_attributes(), "in_features": in_features, "out_features": out_features}
    return {name: values[name] for name in FIELDS}


def plugin_attributes(fields) -> dict:
    """A node's integer attributes from a PluginFieldCollection (other fields are ignored)."""
    return required_attributes({f.name: f.data.reshape(-1)[0] for f in fields if f.name in FIELDS})


def register_plugins(trt) -> list:
    """Register one creator per plugin name with `trt`'s registry; safe to call again."""
    plugin_class, creator_class = _classes(trt)
    registry = trt.get_plugin_registry()
    creators = []
    for name in PLUGIN_NAMES:
        key = (trt.__name__, name)
        if key not in _registered:
            creator = creator_class(name, plugin_class)
            if not registry.register_creator(creator, NAMESPACE):
                raise LrqError(f"TensorRT refused the {NAMESPACE}::{name} plugin creator")
            _registered[key] = creator
        creators.append(_registered[key])
    return creators


_CLASSES: dict[str, tuple] = {}


def _classes(trt):
    if trt.__name__ not in _CLASSES:
        _CLASSES[trt.__name__] = _make_classes(trt)
    return _CLASSES[trt.__name__]


def _make_classes(trt):  # noqa: C901 - the plugin interface is one class by design
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}

    class LinearPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, name: str, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = name, NAMESPACE, VERSION
            self.num_outputs = 1
            self.attrs = required_attributes(attrs)  # optional attributes filled in
            self.phase = phase
            # Layers with equal attributes share timing results.
            self.timing_cache_id = "|".join(f"{k}={self.attrs[k]}" for k in FIELDS)
            self.metadata_string = self.timing_cache_id
            aot.plugin_kernel(name, attrs)  # an unsupported combination fails here, while building

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return LinearPlugin(self.plugin_name, self.attrs, self.phase)

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            dims = trt.DimsExprs(inputs[0])
            dims[len(dims) - 1] = expr_builder.constant(self.attrs["out_features"])
            return [dims]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in float_types
            if pos in (1, 3):  # packed weights, zero points: uint8 bytes typed INT8
                return desc.type == trt.DataType.INT8
            if pos == 2:  # scales
                return desc.type == trt.DataType.HALF
            return desc.type == in_out[0].desc.type  # bias and output follow the activations

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            fields, self._field_data = _int_fields(trt, {k: [self.attrs[k]] for k in FIELDS})
            return fields

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            tensors = [_device_tensor(trt, ptr, desc) for ptr, desc in zip(inputs, input_desc)]
            tensors[1], tensors[3] = tensors[1].view(torch.uint8), tensors[3].view(torch.uint8)
            out = _device_tensor(trt, outputs[0], output_desc[0])
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                out.copy_(run_linear(self.attrs, *tensors))

    class LinearPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, name: str, plugin_class):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = name, NAMESPACE, VERSION
            self.plugin_class = plugin_class
            # The ONNX parser hands over only the node attributes listed here.
            self.field_names, self._field_data = _int_fields(trt, {k: [] for k in FIELDS})

        def create_plugin(self, name, fields, phase):
            return self.plugin_class(self.name, plugin_attributes(fields), phase)

    return LinearPlugin, LinearPluginCreator


def _int_fields(trt, values: dict):
    """A PluginFieldCollection of int32 fields, and the arrays behind it: TensorRT keeps raw
    pointers to their data, so the caller holds the arrays as long as the collection."""
    import numpy as np

    arrays = {name: np.array(v, dtype=np.int32) for name, v in values.items()}
    fields = [trt.PluginField(name, array, trt.PluginFieldType.INT32) for name, array in arrays.items()]
    return trt.PluginFieldCollection(fields), arrays


def run_linear(attrs: dict, x, qweight, scales, zeros, bias=None):
    """One plugin layer on torch tensors: the same kernels and routes as `lrq eval --backend torch`."""
    from . import ops

    scheme, in_features, _ = layer_attributes(attrs)
    return ops.scheme_linear(x, qweight, scales, zeros, bias, scheme, in_features)


_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "BF16": "<i2", "UINT8": "|u1", "INT8": "|i1", "INT32": "<i4"}


class _CudaArray:
    """A device pointer seen through __cuda_array_interface__ (what torch.as_tensor reads)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": shape, "typestr": typestr, "version": 3}


def _device_tensor(trt, ptr: int, desc):
    import torch

    kind = str(desc.type).rsplit(".", 1)[-1]
    if kind not in _TYPESTR:
        raise LrqError(f"lrq plugins do not take {kind} tensors")
    tensor = torch.as_tensor(_CudaArray(ptr, tuple(desc.dims), _TYPESTR[kind]), device="cuda")
    return tensor.view(torch.bfloat16) if kind == "BF16" else tensor
