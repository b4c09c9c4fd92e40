"""The eval stage: options validated once, the checkpoint's figures next to its source's."""

import pytest

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.eval import EvalOptions, evaluate_checkpoint
from lrq_deploy.models import load_model


def test_options_are_checked_on_construction():
    with pytest.raises(LrqError, match="--limit must be >= 1"):
        EvalOptions(limit=0)
    with pytest.raises(LrqError, match="backend must be reference or torch"):
        EvalOptions(backend="tensorrt")


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "vit"
    calibrate("bundled:vit", out, QuantScheme(wbits=8, abits=8, act_asym=False), CalibConfig.of(method="rtn", nsamples=32), device="cpu")
    return out


def test_fp_and_quant_side_by_side(vit_checkpoint):
    result = evaluate_checkpoint(vit_checkpoint, EvalOptions(device="cpu", limit=200))
    fp = load_model("bundled:vit")
    assert result["fp"]["top1"] == fp.adapter.evaluate(fp.model, fp, None, 200, "cpu")["top1"]
    assert result["metric"] == "top1" and (result["method"], result["scheme"]) == ("rtn", "W8A8")
    assert abs(result["quant"]["top1"] - result["fp"]["top1"]) <= 0.02  # W8A8 keeps the classifier
    alone = evaluate_checkpoint(vit_checkpoint, device="cpu", compare_fp=False, limit=200)
    assert alone["fp"] is None and alone["quant"]["top1"] == result["quant"]["top1"]
    one = evaluate_checkpoint(vit_checkpoint, device="cpu", compare_fp=False, limit=1)
    assert one["quant"]["top1"] in (0.0, 1.0)  # --limit: the first N held-out images


def test_task_of_another_family_is_refused(vit_checkpoint):
    with pytest.raises(LrqError, match="metric 'ppl' does not apply to a image_classification model"):
        evaluate_checkpoint(vit_checkpoint, metric="ppl", device="cpu")
