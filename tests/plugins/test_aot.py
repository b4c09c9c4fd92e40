"""What the TensorRT plugins need, computed without TensorRT or a GPU: shape/type rules,
launch parameters, and PTX that Triton compiles for sm_80 / sm_90 / sm_100."""

import importlib.util

import pytest

from lrq_deploy.errors import LrqError
from lrq_deploy.plugins.aot import compile_ptx, launch_params, output_dtype, output_shape, plugin_kernel

W4A16 = {"wbits": 4, "abits": 16, "group_size": 128, "in_features": 4096, "out_features": 11008}
W2A16 = {"wbits": 2, "abits": 16, "group_size": 64, "in_features": 4096, "out_features": 4096}
W4A4 = {"wbits": 4, "abits": 4, "group_size": 0, "in_features": 4096, "out_features": 4096}


def test_shape_and_type_rules():
    assert output_shape((2, 17, 4096), W4A16) == (2, 17, 11008)
    assert output_shape((-1, -1, 4096), W4A16) == (-1, -1, 11008)
    assert output_dtype("float16") == "float16"
    with pytest.raises(LrqError, match="in_features"):
        output_shape((2, 4095), W4A16)
    with pytest.raises(LrqError):
        output_dtype("int8")


def test_kernel_choice_and_launch_parameters():
    kernel = plugin_kernel("W4A16Linear", W4A16)
    assert kernel.kernel == "weight_only_gemm" and kernel.constexprs["BITS"] == 4 and kernel.constexprs["GROUP"] == 128
    assert plugin_kernel("W2A16Linear", W2A16).constexprs["BITS"] == 2
    w4a4 = plugin_kernel("W4A4Linear", W4A4)
    assert w4a4.kernel == "w4a4_fused_gemm" and w4a4.constexprs["GROUP"] == 4096
    params = launch_params(kernel, m=130, n=11008, num_warps=4, shared_bytes=16384)
    assert params == {"grid": (3, 172, 1), "block": (128, 1, 1), "shared_bytes": 16384}
    with pytest.raises(LrqError, match="no plugin kernel"):
        plugin_kernel("W8A8Linear", {**W4A16, "wbits": 8, "abits": 8})


@pytest.mark.parametrize("sm,target", [(80, "sm_80"), (90, "sm_90a"), (100, "sm_100a")])
@pytest.mark.parametrize("attrs,op", [(W4A16, "W4A16Linear"), (W2A16, "W2A16Linear"), (W4A4, "W4A4Linear")])
def test_ptx_for_each_target(sm, target, attrs, op):
    compiled = compile_ptx(plugin_kernel(op, attrs), sm)
    assert compiled.target == target
    assert f".entry {compiled.name}" in compiled.ptx
    assert compiled.num_warps >= 1 and compiled.shared_bytes >= 0
    if op == "W4A4Linear":  # INT4 values on integer tensor cores, int32 accumulation
        assert "s32.s8.s8" in compiled.ptx or "kind::i8" in compiled.ptx  # mma.sync / wgmma / tcgen05


@pytest.mark.parametrize("has_bias,pointers", [(False, 5), (True, 6)])
def test_kernel_parameters_follow_the_plugin_inputs(has_bias, pointers):
    """TensorRT launches an AOT plugin kernel with its input pointers (x, qweight, scales,
    zeros[, bias]), the output pointer, then scalars (M, N, K, groups); Triton appends its
    two scratch pointers after those."""
    compiled = compile_ptx(plugin_kernel("W4A16Linear", {**W4A16, "has_bias": has_bias}), 90)
    entry = compiled.ptx[compiled.ptx.index(f".entry {compiled.name}("):]
    params = [line.split()[1] for line in entry[: entry.index(")")].splitlines()[1:]]
    assert params == [".u64"] * pointers + [".u32"] * 4 + [".u64"] * 2


def test_aot_plugin_launch_arithmetic():
    """The arithmetic the ahead-of-time plugins hand TensorRT, on ints (TensorRT runs the same
    code on symbolic shape expressions, which support +, * and //)."""
    from lrq_deploy.plugins.trt_aot import grid_dims, leading_rows, supports_aot

    kernel = plugin_kernel("W4A16Linear", W4A16)
    assert leading_rows((2, 17, 4096), 3) == 34 and leading_rows((5, 4096), 2) == 5
    assert grid_dims(kernel, 34, 11008) == (1, 172) and grid_dims(kernel, 130, 64) == (3, 1)
    assert grid_dims(kernel, 130, 11008) == launch_params(kernel, 130, 11008, 4, 0)["grid"][:2]
    if importlib.util.find_spec("tensorrt") is None:
        assert not supports_aot()  # TensorRT for RTX alone: Python plugins
