"""Model adapters: graph I/O as exported, DeiT's distillation token, the family table."""

import onnx
import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.export import export_onnx
from lrq_deploy.models import load_model
from lrq_deploy.graph_io import BATCH_AXIS, PAST_AXIS, SEQ_AXIS


def _graph_dims(value):
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


@pytest.mark.parametrize("with_past", [False, True])
def test_llama_graph_io_is_what_export_writes(tiny_llama_dir, tmp_path, with_past):
    """graph_io (names, dtypes, axes, KV-cache layout) describes the exported graph: the input
    generator and the runners rely on it."""
    loaded = load_model(str(tiny_llama_dir))
    io = loaded.adapter.graph_io(loaded.model, with_past)
    export_onnx(str(tiny_llama_dir), tmp_path / "m.onnx", verify=False, with_past=with_past)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == io.input_names and [o.name for o in graph.output] == io.output_names
    assert io.kv_cache == with_past and len(io.inputs) == (1 + 2 * 2 if with_past else 1)
    for spec, value in zip(io.inputs, graph.input):
        dims = _graph_dims(value)
        assert len(dims) == len(spec.dims)
        for want, got in zip(spec.dims, dims):
            if isinstance(want, int):
                assert got == want  # heads and head size are fixed
            else:  # symbolic: the axis name survives export
                assert isinstance(got, str) and want in got, (spec.name, want, got)
    if with_past:
        assert io.inputs[1].dims == (BATCH_AXIS, 2, PAST_AXIS, 16)  # 2 key/value heads of 64 / 4
    assert io.inputs[0].dims == (BATCH_AXIS, SEQ_AXIS)


def test_vit_graph_io():
    loaded = load_model("bundled:vit")
    io = loaded.adapter.graph_io(loaded.model)
    assert io.input_names == ["pixel_values"] and io.inputs[0].dims == (BATCH_AXIS, 1, 8, 8)
    assert io.outputs[0].dims == (BATCH_AXIS, 10) and not io.kv_cache
    with pytest.raises(LrqError, match="--with-past applies to causal language models"):
        loaded.adapter.graph_io(loaded.model, with_past=True)


def test_deit_distilled_calibrates_exports_and_verifies(tiny_deit_dir, tmp_path):
    """DeiT (class + distillation tokens, averaged heads at inference) through the ViT adapter:
    learnable W4A4 calibration, reload, ONNX export verified against torch."""
    from lrq_deploy.checkpoint import load_checkpoint

    fp = load_model(str(tiny_deit_dir))
    assert type(fp.model).__name__ == "VisionTransformerDistilled" and fp.model.num_prefix_tokens == 2
    result = calibrate(str(tiny_deit_dir), tmp_path / "q", QuantScheme(wbits=4, abits=4, act_asym=False),
                       CalibConfig.of(method="lrquant", nsamples=32, epochs=1), device="cpu")
    assert len(result["blocks"]) == 2 and all(b["cosine"] > 0.99 for b in result["blocks"])
    quant = load_checkpoint(tmp_path / "q")
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(quant.model(images).flatten(), fp.model(images).flatten(), dim=0)
    assert cosine > 0.95  # W4A4 on an untrained 2-block model: close, not equal
    report = export_onnx(tmp_path / "q", tmp_path / "deit.onnx", limit=64)
    assert report["verify"]["logits"]["passed"] and report["verify"]["argmax_agreement"] == 1.0
    assert report["verify"]["onnxruntime"] == report["verify"]["torch"]  # top-1 on the held-out digits


def test_vit_top1_on_an_image_folder(digits_folder, tmp_path):
    """--data DIR (ImageFolder): the same images as the bundled split, through PNG (8-bit pixels)."""
    from lrq_deploy.eval import evaluate_checkpoint

    vit = load_model("bundled:vit")
    folder = vit.adapter.evaluate(vit.model, vit, digits_folder, None, "cpu")["top1"]
    bundled = vit.adapter.evaluate(vit.model, vit, None, None, "cpu")  # all held-out digits
    images, labels = vit.adapter.image_folder(vit.model, digits_folder)
    assert images.shape == (120, 1, 8, 8) and len(set(labels.tolist())) == 10
    assert abs(folder - bundled["top1"]) < 0.05  # 120 of the same images, 8-bit rounded
    calibrate("bundled:vit", tmp_path / "q", QuantScheme(wbits=8, abits=8, act_asym=False), CalibConfig.of(method="rtn", nsamples=64),
              calib_data=digits_folder, device="cpu")
    result = evaluate_checkpoint(tmp_path / "q", data=digits_folder, device="cpu")
    assert result["fp"]["top1"] == folder and abs(result["quant"]["top1"] - folder) <= 0.02
