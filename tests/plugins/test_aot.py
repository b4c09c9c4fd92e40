"""What the TensorRT plugins need, computed without TensorRT or a GPU: shape/type rules,
the dispatch table's kernel for each node, launch parameters, and PTX that Triton compiles for
sm_80 / sm_90 / sm_100 with the JIT's alignment hints."""


import pytest

from lrq_deploy.errors import LrqError
from lrq_deploy.plugins import dispatch
from lrq_deploy.plugins.aot import compile_ptx, launch_params, output_dtype, output_shape, plugin_kernel

W4A16 = {"wbits": 4, "abits": 16, "group_size": 128, "symmetric": 0, "in_features": 4096, "out_features": 11008}
W2A16 = {"wbits": 2, "abits": 16, "group_size": 64, "symmetric": 0, "in_features": 4096, "out_features": 4096}
W4A4 = {"wbits": 4, "abits": 4, "group_size": 0, "symmetric": 0, "in_features": 4096, "out_features": 4096}
W8A8 = {"wbits": 8, "abits": 8, "group_size": 0, "symmetric": 0, "in_features": 4096, "out_features": 4096}
W4A4_ASYM = {**W4A4, "act_asym": 1}


def test_shape_and_type_rules():
    assert output_shape((2, 17, 4096), W4A16) == (2, 17, 11008)
    assert output_shape((-1, -1, 4096), W4A16) == (-1, -1, 11008)
    assert output_dtype("float16") == "float16"
    with pytest.raises(LrqError, match="in_features"):
        output_shape((2, 4095), W4A16)
    with pytest.raises(LrqError):
        output_dtype("int8")


def test_kernel_choice_follows_the_dispatch_table():
    kernel = plugin_kernel("W4A16Linear", W4A16, sm=90)
    assert kernel.kernel == "gemm" and kernel.constexprs["BITS"] == 4 and kernel.constexprs["GROUP"] == 128
    table = dispatch.config("gemm", "90")
    assert kernel.constexprs["BLOCK_M"] == table["BLOCK_M"] and kernel.num_warps == table["num_warps"]
    assert kernel.constexprs["BLOCK_M"] % 64 == 0 and kernel.num_warps % 4 == 0  # wgmma on sm_90
    assert plugin_kernel("W2A16Linear", W2A16).constexprs["BITS"] == 2
    w4a4 = plugin_kernel("W4A4Linear", W4A4)
    assert w4a4.kernel == "int_gemm" and w4a4.constexprs["QUANTIZE_X"] and w4a4.constexprs["GROUP"] == 4096
    assert plugin_kernel("W8A8Linear", W8A8).constexprs["BITS"] == 8
    assert plugin_kernel("W4A4Linear", W4A4_ASYM).constexprs["ACT_ASYM"] and not w4a4.constexprs["ACT_ASYM"]
    params = launch_params(kernel, m=130, n=11008, num_warps=4, shared_bytes=16384)
    block_m, block_n = kernel.constexprs["BLOCK_M"], kernel.constexprs["BLOCK_N"]
    assert params == {"grid": (-(-130 // block_m), -(-11008 // block_n), 1), "block": (128, 1, 1), "shared_bytes": 16384}
    with pytest.raises(LrqError, match="no plugin kernel"):
        plugin_kernel("W2A4Linear", {**W4A16, "wbits": 2, "abits": 4})


def test_alignment_hints_as_the_jit_adds_them():
    kernel = plugin_kernel("W4A16Linear", W4A16)
    pointers = {name for name, kind in kernel.signature.items() if kind.startswith("*")}
    assert pointers <= set(kernel.hints) and {"N", "K", "stride_w"} <= set(kernel.hints)
    assert "M" not in kernel.hints  # dynamic
    odd = plugin_kernel("W4A16Linear", {**W4A16, "in_features": 4112, "group_size": 16})  # rows of 2056 bytes
    assert "stride_w" not in odd.hints


@pytest.mark.parametrize("sm,target", [(80, "sm_80"), (90, "sm_90a"), (100, "sm_100a")])
@pytest.mark.parametrize("attrs,op", [(W4A16, "W4A16Linear"), (W2A16, "W2A16Linear"), (W4A4, "W4A4Linear"),
                                      (W4A4_ASYM, "W4A4Linear")])
def test_ptx_for_each_target(sm, target, attrs, op):
    kernel = plugin_kernel(op, attrs, sm=sm)
    compiled = compile_ptx(kernel, sm)
    assert compiled.target == target
    assert f".entry {compiled.name}" in compiled.ptx
    assert compiled.num_warps == kernel.num_warps  # the dispatch table's warps, not Triton's default
    assert f".reqntid {32 * kernel.num_warps}" in compiled.ptx or f".maxntid {32 * kernel.num_warps}" in compiled.ptx
    assert compiled.shared_bytes > 0  # tensor-core tiles are staged through shared memory
    if op == "W4A4Linear":  # INT4 values on integer tensor cores, int32 accumulation
        assert "s32.s8.s8" in compiled.ptx or "kind::i8" in compiled.ptx  # mma.sync / wgmma / tcgen05
    else:
        assert "f32.f16.f16" in compiled.ptx or "kind::f16" in compiled.ptx


@pytest.mark.parametrize("has_bias,pointers", [(False, 5), (True, 6)])
@pytest.mark.parametrize("op,attrs", [("W4A16Linear", W4A16), ("W4A4Linear", W4A4), ("W4A4Linear", W4A4_ASYM)])
def test_kernel_parameters_follow_the_plugin_inputs(has_bias, pointers, op, attrs):
    """TensorRT launches an AOT plugin kernel with its input pointers (x, qweight, scales,
    zeros[, bias]), the output pointer, then scalars (M, N, K, groups, row stride); Triton
    appends its two scratch pointers after those."""
    compiled = compile_ptx(plugin_kernel(op, attrs, has_bias=has_bias), 90)
    entry = compiled.ptx[compiled.ptx.index(f".entry {compiled.name}("):]
    params = [line.split()[1] for line in entry[: entry.index(")")].splitlines()[1:]]
    assert params == [".u64"] * pointers + [".u32"] * 5 + [".u64"] * 2


def test_aot_plugin_launch_arithmetic():
    """The arithmetic the ahead-of-time plugins hand TensorRT, on ints (TensorRT runs the same
    code on symbolic shape expressions, which support +, * and //)."""
    from lrq_deploy.plugins.trt_aot import grid_dims, leading_rows, scalar_args

    kernel = plugin_kernel("W4A16Linear", W4A16)
    block_m, block_n = kernel.constexprs["BLOCK_M"], kernel.constexprs["BLOCK_N"]
    assert leading_rows((2, 17, 4096), 3) == 34 and leading_rows((5, 4096), 2) == 5
    assert grid_dims(kernel, 34, 11008) == (-(-34 // block_m), -(-11008 // block_n))
    assert grid_dims(kernel, 130, 11008) == launch_params(kernel, 130, 11008, 4, 0)["grid"][:2]
    assert scalar_args(W4A16) == (11008, 4096, 32, 512) and scalar_args(W2A16) == (4096, 4096, 64, 256)
    with pytest.raises(LrqError, match="int32 words"):
        scalar_args({**W4A16, "in_features": 4100, "group_size": 0})



def test_supports_aot_follows_the_installed_tensorrt(monkeypatch):
    """AOT plugins exactly when `tensorrt.plugin` has aot_impl: absent, broken or older
    packages give the Python plugins."""
    import sys
    import types

    from lrq_deploy.plugins.trt_aot import supports_aot

    def install(plugin):
        package = types.ModuleType("tensorrt")
        if plugin is not None:
            package.plugin = plugin
            monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
        else:
            monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)  # import fails
        monkeypatch.setitem(sys.modules, "tensorrt", package)

    install(None)
    assert not supports_aot()
    install(types.SimpleNamespace())  # TensorRT 10.x before AOT plugins
    assert not supports_aot()
    install(types.SimpleNamespace(aot_impl=lambda *a: None))
    assert supports_aot()
