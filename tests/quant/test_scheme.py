"""One scheme object decides which kernel family serves a layer and what a group size means;
the kernels, ONNX lowering and both TensorRT plugin kinds ask it."""

import re
from pathlib import Path

import pytest

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import KernelFamily, QuantScheme, group_from_attr, group_length, kernel_schemes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("wbits,abits,family", [
    (4, 16, KernelFamily.WEIGHT_ONLY), (3, 16, KernelFamily.WEIGHT_ONLY), (2, 16, KernelFamily.WEIGHT_ONLY),
    (8, 16, None), (6, 16, None), (4, 4, KernelFamily.INTEGER), (4, 8, KernelFamily.INTEGER), (8, 8, KernelFamily.INTEGER),
    (6, 6, KernelFamily.INTEGER), (2, 4, None), (16, 8, None),
])
def test_kernel_rule(wbits, abits, family):
    scheme = QuantScheme(wbits=wbits, abits=abits, act_asym=False)
    assert scheme.kernel is family
    if family is None:
        with pytest.raises(LrqError, match=f"no kernel for W{wbits}A{abits}"):
            scheme.require_kernel()


def test_group_size_has_one_meaning():
    assert group_length(None, 192) == 192 and group_length(64, 192) == 64
    with pytest.raises(LrqError, match="does not divide"):
        group_length(100, 192)
    assert group_from_attr(0) is None and group_from_attr(64) == 64
    scheme = QuantScheme.from_attributes({"wbits": 4, "abits": 16, "group_size": 0, "symmetric": 1})
    assert scheme == QuantScheme(4, 16, None, True) and scheme.to_attributes()["group_size"] == 0
    assert scheme.groups(4096) == 1


def test_onnx_lowering_and_plugins_ask_the_scheme(monkeypatch):
    from onnx import helper

    from lrq_deploy.export import lower_ort
    from lrq_deploy.export.graph import QuantNode
    from lrq_deploy.plugins.trt_plugins import PLUGIN_NAMES

    node = helper.make_node("QuantLinear", ["x"], ["y"])
    for wbits in (2, 3, 4, 6, 8):
        for abits in (4, 6, 8, 16):
            scheme = QuantScheme(wbits, abits)
            chosen = []
            monkeypatch.setattr(lower_ort, "lower_integer", lambda *a, **k: chosen.append("integer") or [])
            monkeypatch.setattr(lower_ort, "lower_standard", lambda *a, **k: chosen.append("standard") or [])
            lower_ort.lower_for_ort(None, QuantNode(node, scheme, 64), "p")
            assert chosen == ["integer" if scheme.kernel is KernelFamily.INTEGER else "standard"]
    assert list(PLUGIN_NAMES) == [QuantScheme(w, a).plugin_name for w, a in kernel_schemes()]


def test_run_linear_routes_by_the_scheme(monkeypatch):
    from lrq_deploy.plugins import ops
    from lrq_deploy.plugins.trt_plugins import run_linear

    calls = []
    monkeypatch.setattr(ops, "integer_linear", lambda *a: calls.append(("integer", a[5:])))
    monkeypatch.setattr(ops, "weight_only_linear", lambda *a: calls.append(("weight_only", a[5:])))
    attrs = {"wbits": 3, "abits": 16, "group_size": 64, "in_features": 192, "out_features": 8, "symmetric": 0}
    run_linear(attrs, *[None] * 4)
    run_linear({**attrs, "wbits": 8, "abits": 8, "group_size": 0}, *[None] * 4)
    run_linear({**attrs, "wbits": 4, "abits": 4, "group_size": 0, "act_asym": 1}, *[None] * 4)
    assert calls == [("weight_only", (4, 64)), ("integer", (8, 8, 192, False)), ("integer", (4, 4, 192, True))]


def test_rules_are_defined_once():
    """No other source spells the scheme -> kernel rule or turns a group size into a length."""
    sources = [p for p in (ROOT / "lrq_deploy").rglob("*.py")] + list((ROOT / "plugins").glob("*.py"))
    rule = re.compile(r"abits\s*==\s*16\s+and\s+\w*wbits\s+in|\(wbits,\s*abits\)\s*==|group_size\s+or\s+\w")
    offenders = [str(p.relative_to(ROOT)) for p in sources if p.name != "scheme.py" and rule.search(p.read_text())]
    assert offenders == []


def every_scheme():
    for wbits in (2, 3, 4, 6, 8, 16):
        for abits in (4, 6, 8, 16):
            for group in (None, 64):
                for symmetric in (False, True):
                    for act_asym in (False, True):
                        try:
                            yield QuantScheme(wbits, abits, group, symmetric, act_asym)
                        except LrqError:  # combinations the scheme refuses (W16A16, asym A16)
                            pass


def test_round_trip_config_manifest_node_plugin():
    """config -> manifest -> ONNX node attributes -> plugin attributes -> back, for every scheme."""
    import json

    import numpy as np
    from onnx import helper

    from lrq_deploy.calib.api import QUANT_OPTIONS
    from lrq_deploy.export.graph import as_quant_node
    from lrq_deploy.plugins.trt_plugins import FIELDS, plugin_attributes, required_attributes

    schemes = list(every_scheme())
    assert len(schemes) > 100
    for scheme in schemes:
        cli = QuantScheme(**{name: getattr(scheme, name) for name in QUANT_OPTIONS})
        manifest = QuantScheme.from_dict(json.loads(json.dumps(cli.to_dict())))
        node = helper.make_node("QuantLinear", ["x", "w", "s", "z"], ["y"], domain="lrq",
                                **manifest.to_attributes(), in_features=128)
        from_node = as_quant_node(node)
        plugin = required_attributes({**from_node.scheme.to_attributes(), "in_features": 128, "out_features": 32})
        assert tuple(plugin) == FIELDS

        class Field:  # what TensorRT hands a plugin creator
            def __init__(self, name, value):
                self.name, self.data = name, np.array([value], dtype=np.int32)

        back = plugin_attributes([Field(k, v) for k, v in plugin.items()])
        assert QuantScheme.from_attributes(back) == from_node.scheme == manifest == cli == scheme


def test_the_wire_refuses_what_it_cannot_read():
    with pytest.raises(LrqError, match="lacks attributes symmetric"):
        QuantScheme.from_attributes({"wbits": 4, "abits": 16, "group_size": 0})
    with pytest.raises(LrqError, match="unknown quantization fields"):
        QuantScheme.from_dict({"wbits": 4, "abits": 16, "kvformat": "fp8"})
    with pytest.raises(LrqError, match="weight format must be one of"):
        QuantScheme(wbits=4, wformat="fp4")
    assert QuantScheme.from_attributes({"wbits": 4, "abits": 4, "group_size": 0, "symmetric": 0}).act_asym is False


def test_activations_are_asymmetric_by_default_and_old_records_stay_symmetric():
    assert QuantScheme(wbits=4, abits=4).act_asym is True
    assert QuantScheme(wbits=4, abits=8, act_asym=False).act_asym is False
    assert QuantScheme(wbits=4).act_asym is False  # nothing to quantize: the flag is off
    assert QuantScheme.from_dict({"wbits": 4, "abits": 4, "group_size": None, "symmetric": False}).act_asym is False
    scheme = QuantScheme(wbits=4, abits=4)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert QuantScheme.from_attributes(scheme.to_attributes()) == scheme
