"""Float grids (quant/floats.py): every E2M1 / E4M3 code round-trips, rounding is nearest-even
with saturation exactly as torch's float8 cast and onnxruntime's saturating QuantizeLinear do,
and NVFP4 / MXFP4 block scaling matches hand-computed blocks (saturation, subnormals, zero blocks);
an onnxruntime graph in standard ops dequantizes NVFP4 codes bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrq_deploy.quant.floats import (
    E2M1, E4M3, decode, e8m0_scale, encode, fake_quant_fp8, fake_quant_mxfp4, fake_quant_nvfp4, fp8_scale,
    mxfp4_quantize, nvfp4_quantize, round_to_format,
)

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_every_e2m1_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode(codes, E2M1)
    assert values[:8].tolist() == E2M1_VALUES and values[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.equal(encode(values, E2M1), codes)
    assert torch.equal(round_to_format(values, E2M1), values)


def test_every_e4m3_code_round_trips():
    codes = torch.arange(256, dtype=torch.uint8)
    values = decode(codes, E4M3)
    finite = ~values.isnan()
    assert int((~finite).sum()) == 2 and values[finite].abs().max() == 448  # 0x7F / 0xFF are NaN
    assert torch.equal(encode(values[finite], E4M3), codes[finite])
    assert torch.equal(values[finite], torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()[finite])
    assert decode(torch.tensor([1]), E4M3).item() == 2.0 ** -9  # the smallest subnormal


@pytest.mark.parametrize("x, want", [
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties to even
    (5.1, 6.0), (7.0, 6.0), (1e9, 6.0), (-7.0, -6.0), (0.26, 0.5), (-0.2, -0.0),  # saturation, signs
])
def test_e2m1_rounding_by_hand(x, want):
    assert round_to_format(torch.tensor([x]), E2M1).item() == want


def test_e4m3_rounding_is_torchs_float8_cast_with_saturation():
    gen = torch.Generator().manual_seed(0)
    for spread in (1e-3, 1.0, 100.0):  # subnormals, normals, near the top
        x = (torch.randn(200_000, generator=gen) * spread).clamp(-448, 448)
        assert torch.equal(round_to_format(x, E4M3), x.to(torch.float8_e4m3fn).float())
    assert round_to_format(torch.tensor([464.0, 1e6, -500.0]), E4M3).tolist() == [448.0, 448.0, -448.0]


def test_e4m3_rounding_is_onnxruntimes_saturating_quantizer():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zero"], ["q"], saturate=1),
         helper.make_node("DequantizeLinear", ["q", "s", "zero"], ["y"])], "fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(1).standard_normal(100_000) * 300).astype(np.float32)
    assert np.array_equal(session.run(None, {"x": x})[0], round_to_format(torch.from_numpy(x), E4M3).numpy())


def test_nvfp4_block_by_hand():
    """Tensor amax 6 * 448 * 2^-8 sets the tensor scale; a block's scale is E4M3(amax / 6 / tensor scale)."""
    block = torch.tensor([10.5, -3.0, 0.7, 0.0] + [0.0] * 12)
    zeros = torch.zeros(16)
    x = torch.stack([block, zeros])  # a zero block too
    codes, scale_codes, tensor_scale = nvfp4_quantize(x)
    assert tensor_scale.item() == pytest.approx(10.5 / (6 * 448))
    block_scale = decode(scale_codes, E4M3)
    assert block_scale[1].item() == 0.0 and torch.equal(codes[1], torch.zeros(16, dtype=torch.uint8))
    assert block_scale[0].item() == round_to_format(torch.tensor(448.0), E4M3).item()  # the largest block: E4M3's max
    step = block_scale[0] * tensor_scale
    values = decode(codes[0], E2M1) * step
    want = round_to_format(block / step, E2M1) * step
    assert torch.equal(values, want) and values[0].item() == pytest.approx(6 * step.item())
    assert torch.equal(fake_quant_nvfp4(x), torch.stack([want, zeros]))


def test_mxfp4_block_by_hand():
    """amax 5 -> shared exponent floor(log2 5) - 2 = 0 (scale 1); amax 100 -> 2^(6-2) = 16; zero block -> 1."""
    assert e8m0_scale(torch.tensor([5.0, 100.0, 0.0, 0.75])).tolist() == [1.0, 16.0, 1.0, 0.125]
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([5.0, -2.9, 0.25, 6.5])
    x[1, :3] = torch.tensor([100.0, 90.0, -7.0])
    codes, exponents = mxfp4_quantize(x)
    assert exponents.flatten().tolist() == [0, 4, 0]
    out = fake_quant_mxfp4(x)
    assert out[0, :4].tolist() == [4.0, -3.0, 0.0, 6.0]  # 6.5 saturates to 6
    assert out[1, :3].tolist() == [96.0, 96.0, -8.0]  # 100 / 16 = 6.25 -> 6; 90 / 16 = 5.6 -> 6; -7 / 16 -> -0.5
    assert torch.equal(out[2], torch.zeros(32))
    assert torch.equal(decode(codes, E2M1) * torch.ldexp(torch.ones(3, 1), exponents).repeat_interleave(32, 1), out)


def test_fake_quant_passes_gradients_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    for fn in (lambda t: fake_quant_fp8(t, fp8_scale(t.detach(), dim=-1)), fake_quant_nvfp4, fake_quant_mxfp4):
        x.grad = None
        fn(x).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
    scale = fp8_scale(x.detach()).clone().requires_grad_(True)
    fake_quant_fp8(x.detach(), scale).pow(2).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)  # a learnable scale receives a gradient


def test_nvfp4_dequantizes_bit_exactly_in_onnxruntime():
    """Standard ops (onnxruntime's CPU provider has no FLOAT4E2M1 kernels): E2M1 codes through a
    16-entry Gather table, E4M3 block scales through DequantizeLinear with the FP32 tensor scale."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    codes, scale_codes, tensor_scale = nvfp4_quantize(w)
    scales = TensorProto()
    scales.name, scales.data_type = "block_scales", TensorProto.FLOAT8E4M3FN
    scales.dims.extend(scale_codes.shape)
    scales.raw_data = scale_codes.numpy().tobytes()
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["block_scales", "tensor_scale"], ["step"]),
         helper.make_node("Gather", ["table", "codes"], ["values"]),
         helper.make_node("Reshape", ["values", "blocked"], ["blocks"]),
         helper.make_node("Unsqueeze", ["step", "last"], ["step_b"]),
         helper.make_node("Mul", ["blocks", "step_b"], ["scaled"]),
         helper.make_node("Reshape", ["scaled", "shape"], ["w"])], "nvfp4", [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 64])],
        [scales, numpy_helper.from_array(np.array(tensor_scale.item(), np.float32), "tensor_scale"),
         numpy_helper.from_array(decode(torch.arange(16), E2M1).numpy(), "table"),
         numpy_helper.from_array(codes.numpy().astype(np.int64), "codes"),
         numpy_helper.from_array(np.array([8, 4, 16], np.int64), "blocked"),
         numpy_helper.from_array(np.array([-1], np.int64), "last"),
         numpy_helper.from_array(np.array([8, 64], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {})[0], fake_quant_nvfp4(w).numpy())


def test_encode_by_comparison_is_bit_equal_to_encode():
    """The graph-friendly E4M3 encoding (comparisons and arithmetic) against frexp's: random values at
    six magnitudes, every grid value, every midpoint (ties to even) of either sign, subnormals,
    saturation and both zeros; and the table decode against decode."""
    from lrq_deploy.quant.floats import decode_by_table, encode_by_comparison

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50000, generator=gen) * s for s in (1e-4, 1e-2, 1, 30, 300, 1000)])
    grid = decode(torch.arange(256), E4M3)
    grid = grid[~grid.isnan()].sort().values
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([x, grid, mid, -mid, torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 465.0, -1e-30, 1e-30, 2.0 ** -10])])
    assert torch.equal(encode_by_comparison(x, E4M3), encode(round_to_format(x, E4M3), E4M3))
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(decode_by_table(codes, E4M3).nan_to_num(7.0), decode(codes, E4M3).nan_to_num(7.0))
