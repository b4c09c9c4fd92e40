"""The runtime layer: one comparison (Polygraphy's Comparator + cosine / argmax), runners with
Polygraphy's interface, one input generator; export and engine verification both use them."""

import numpy as np
import pytest

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.export import export_onnx
from lrq_deploy.models import load_model
from lrq_deploy.graph_io import TensorSpec
from lrq_deploy.runtime import compare as compare_module
from lrq_deploy.runtime.compare import compare_runs, run_iterations
from lrq_deploy.runtime.inputs import axis_of, benchmark_sizes, make_feeds
from lrq_deploy.runtime.runners import TorchRunner, ort_runner


def test_compare_runs_statistics_by_hand():
    ref = [{"y": np.array([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])}, {"y": np.array([[2.0, 0.0, 0.0]])}]
    same = compare_runs(("a", ref), ("b", [{k: v.copy() for k, v in it.items()} for it in ref]))["y"]
    assert same["max_abs_error"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert same["argmax_agreement"] == 1.0 and same["passed"] and same["iterations"] == 2
    # first iteration: one row's argmax moves (errors 2, 2, 0 | 0 0 0); second: +1 on one element
    other = [{"y": np.array([[3.0, 1.0, 2.0], [0.0, -1.0, 4.0]])}, {"y": np.array([[2.0, 0.0, 1.0]])}]
    diff = compare_runs(("a", ref), ("b", other), atol=0.5, rtol=0.0)["y"]
    assert diff["max_abs_error"] == 2.0
    assert diff["mean_abs_error"] == pytest.approx((2 + 2 + 1) / 9)  # weighted by elements, not per iteration
    assert diff["argmax_agreement"] == pytest.approx(2 / 3)
    a, b = np.concatenate([r["y"].ravel() for r in ref]), np.concatenate([o["y"].ravel() for o in other])
    assert diff["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert not diff["passed"]


def test_input_generator_follows_axis_names():
    specs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
             TensorSpec("past.0.key", "float32", ("batch", 2, "past_seq", 8))]
    sizes, description, items, unit = benchmark_sizes(specs, batch=3, seq_len=40)
    feeds = make_feeds(specs, sizes)
    assert feeds["input_ids"].shape == (3, 1) and feeds["past.0.key"].shape == (3, 2, 40, 8)
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].max() < 100
    assert (items, unit) == (3, "tokens") and "decode step" in description
    assert axis_of("past_seq") == "past" and axis_of("s0") is None
    embeds = [TensorSpec("inputs_embeds", "float32", ("batch", "seq", 64))]  # LLaVA's language model
    sizes, description, items, _ = benchmark_sizes(embeds, batch=2, seq_len=40)
    assert make_feeds(embeds, sizes)["inputs_embeds"].shape == (2, 40, 64) and items == 80 and "prefill" in description
    masked = [TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("attention_mask", "int64", ("batch", "seq"))]
    feeds = make_feeds(masked, benchmark_sizes(masked, batch=2, seq_len=8)[0])
    assert (feeds["attention_mask"] == 1).all() and feeds["input_ids"].shape == (2, 8)  # encoders: no padding
    in_place = specs + [TensorSpec("attention_mask", "int64", ("batch", "total"))]  # a cache kept in place
    feeds = make_feeds(in_place, benchmark_sizes(in_place, batch=3, seq_len=40)[0])
    assert feeds["attention_mask"].shape == (3, 41) and (feeds["attention_mask"] == 1).all()  # past + the new token


def test_torch_runner_speaks_polygraphy_and_matches_the_model():
    import torch

    loaded = load_model("bundled:llama")
    runner = TorchRunner(loaded, "cpu")
    ids = np.random.default_rng(0).integers(0, 100, (2, 16))
    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        out = runner.infer({"input_ids": ids})
    assert list(meta.keys()) == ["input_ids"] and list(meta["input_ids"].shape) == ["batch", "seq"]
    with torch.no_grad():
        expected = loaded.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_array_equal(out["logits"], expected)


@pytest.fixture(scope="module")
def w4_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    calibrate("bundled:llama", root / "w4", QuantScheme(wbits=4, group_size=64), CalibConfig.of(nsamples=2, seqlen=32),
              device="cpu")
    return root, export_onnx(root / "w4", root / "w4.onnx", target="ort", limit=2)


def test_export_verification_goes_through_the_one_comparison(w4_graph):
    _, report = w4_graph
    logits = report["verify"]["logits"]
    assert set(logits) >= {"max_abs_error", "mean_abs_error", "max_rel_error", "mean_rel_error", "cosine",
                           "argmax_agreement", "passed"}
    assert logits["passed"] and logits["cosine"] > 0.99999 and logits["max_abs_error"] < 1e-3
    assert report["verify"]["max_abs_logit_error"] == logits["max_abs_error"]


def test_engine_verification_uses_the_same_runners_and_comparison(w4_graph, monkeypatch):
    """verify_engine with the TensorRT runner replaced by onnxruntime on the same graph: the
    path (input generator, runners, compare_runs) is the export's; identical sides compare equal."""
    from lrq_deploy.engine import verify

    root, _ = w4_graph
    calls = []
    real = compare_module.compare_runs
    monkeypatch.setattr(verify, "compare_runs", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(verify, "TrtRunner", lambda path, flavour=None: ort_runner(root / "w4.onnx"))
    results = verify.verify_engine(root / "unused.engine", root / "w4.onnx", {"input_ids": ((1, 1), (2, 24), (4, 64))})
    assert calls and calls[0][0][0] == "onnxruntime" and calls[0][1][0] == "tensorrt"
    assert results["logits"]["max_abs_error"] == 0 and results["logits"]["argmax_agreement"] == 1.0


def test_ort_runner_is_polygraphys(w4_graph):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    root, _ = w4_graph
    runner = ort_runner(root / "w4.onnx")
    assert isinstance(runner, OnnxrtRunner)
    outs = run_iterations(runner, [{"input_ids": np.zeros((1, 8), dtype=np.int64)}])
    assert outs[0]["logits"].shape[:2] == (1, 8)
