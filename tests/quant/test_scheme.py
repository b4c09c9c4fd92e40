"""One scheme object decides which kernel family serves a layer and what a group size means;
the kernels, ONNX lowering and both TensorRT plugin kinds ask it."""

import re
from pathlib import Path

import pytest

from lrq_deploy.config import QuantConfig
from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import KernelFamily, QuantScheme, group_from_attr, group_length, kernel_schemes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("wbits,abits,family", [
    (4, 16, KernelFamily.WEIGHT_ONLY), (3, 16, KernelFamily.WEIGHT_ONLY), (2, 16, KernelFamily.WEIGHT_ONLY),
    (8, 16, None), (6, 16, None), (4, 4, KernelFamily.INTEGER), (4, 8, KernelFamily.INTEGER), (8, 8, KernelFamily.INTEGER),
    (6, 6, KernelFamily.INTEGER), (2, 4, None), (16, 8, None),
])
def test_kernel_rule(wbits, abits, family):
    scheme = QuantScheme.from_config(QuantConfig(wbits=wbits, abits=abits))
    assert scheme.kernel is family
    if family is None:
        with pytest.raises(LrqError, match=f"no kernel for W{wbits}A{abits}"):
            scheme.require_kernel()


def test_group_size_has_one_meaning():
    assert group_length(None, 192) == 192 and group_length(64, 192) == 64
    with pytest.raises(LrqError, match="does not divide"):
        group_length(100, 192)
    assert group_from_attr(0) is None and group_from_attr(64) == 64
    scheme = QuantScheme.from_attrs({"wbits": 4, "abits": 16, "group_size": 0, "symmetric": 1})
    assert scheme == QuantScheme(4, 16, None, True) and scheme.group_attr == 0 and scheme.groups(4096) == 1


def test_onnx_lowering_and_plugins_ask_the_scheme():
    from onnx import helper

    from lrq_deploy.export.lower import LinearNode, _integer_eligible
    from lrq_deploy.plugins.trt_plugins import PLUGIN_NAMES

    node = helper.make_node("QuantLinear", ["x"], ["y"])
    for wbits in (2, 3, 4, 6, 8):
        for abits in (4, 6, 8, 16):
            ln = LinearNode(node, wbits, abits, 0, 64)
            assert _integer_eligible(ln) == (QuantScheme(wbits, abits).kernel is KernelFamily.INTEGER)
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
