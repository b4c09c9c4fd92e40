"""Benchmark statistics on a fake clock (exact), and real runs of the ort and torch backends."""

import json

import pytest
from click.testing import CliRunner

from lrq_deploy.bench.harness import measure, report
from lrq_deploy.bench.report import ratio
from lrq_deploy.bench.runners import Runner, Timing, Workload
from lrq_deploy.bench.stats import percentile, summarize
from lrq_deploy.cli import main


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeRunner(Runner):
    """Each inference advances the fake clock by the next latency of a fixed cycle."""

    name = "fake"

    def __init__(self, clock, cycle_ms, compute_ms=None):
        self.clock, self.cycle, self.compute, self.calls = clock, cycle_ms, compute_ms, 0

    def workload(self):
        return Workload("fake", items_per_inference=4, unit="tokens")

    def infer(self):
        ms = self.cycle[self.calls % len(self.cycle)]
        self.calls += 1
        self.clock.now += ms / 1e3
        return Timing(latency_ms=ms, compute_ms=None if self.compute is None else ms * self.compute)


def test_percentile_nearest_rank():
    data = sorted(float(x) for x in range(1, 101))
    assert percentile(data, 90) == 90.0
    assert percentile(data, 99) == 99.0
    assert percentile(data, 100) == 100.0
    assert percentile([5.0], 50) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_summary_statistics():
    stats = summarize([4.0, 1.0, 3.0, 2.0], (50, 75))
    assert stats == {"min": 1.0, "max": 4.0, "mean": 2.5, "median": 2.5, "percentiles": {"50": 2.0, "75": 3.0}}


def test_measure_follows_trtexec_semantics():
    clock = FakeClock()
    runner = FakeRunner(clock, [10.0, 20.0, 30.0, 40.0])
    # warm-up 50 ms: 10 + 20 + 30 = 60 ms, three inferences, not recorded
    timings, walltime = measure(runner, warm_up_ms=50, iterations=5, duration_s=0.2, clock=clock)
    # then at least 5 inferences and at least 200 ms: 40,10,20,30,40 = 140 ms < 200, +10,+20,+30 = 200
    assert [t.latency_ms for t in timings] == [40, 10, 20, 30, 40, 10, 20, 30]
    assert walltime == pytest.approx(0.2)
    result = report(runner, timings, walltime, (50, 90))
    assert result["inferences"] == 8
    assert result["throughput_qps"] == pytest.approx(40.0)
    assert result["throughput_tokens_per_s"] == pytest.approx(160.0)
    assert result["latency_ms"]["mean"] == pytest.approx(25.0)
    assert result["latency_ms"]["median"] == pytest.approx(25.0)
    assert result["latency_ms"]["percentiles"] == {"50": 20.0, "90": 40.0}
    assert any("unstable" in w for w in result["warnings"])


def test_gpu_compute_and_host_bound_warning():
    clock = FakeClock()
    runner = FakeRunner(clock, [10.0], compute_ms=0.5)
    timings, walltime = measure(runner, warm_up_ms=0, iterations=3, duration_s=0, clock=clock)
    result = report(runner, timings, walltime)
    assert result["gpu_compute_ms"]["mean"] == pytest.approx(5.0)
    assert result["total_gpu_compute_s"] == pytest.approx(0.015)
    assert any("bound by the host" in w for w in result["warnings"])
    assert not any("unstable" in w for w in result["warnings"])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from lrq_deploy.calib.api import calibrate
    from lrq_deploy.calib.registry import CalibConfig
    from lrq_deploy.quant.scheme import QuantScheme
    from lrq_deploy.export import export_onnx

    root = tmp_path_factory.mktemp("bench")
    calibrate("bundled:llama", root / "w4", QuantScheme(wbits=4, group_size=64), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    calibrate("bundled:llama", root / "w8a8", QuantScheme(wbits=8, abits=8, act_asym=False), CalibConfig.of(method="smoothquant", nsamples=2, seqlen=32), device="cpu")
    export_onnx(root / "w4", root / "w4.onnx", verify=False)
    export_onnx(root / "w8a8", root / "w8a8.onnx", verify=False)
    report = export_onnx("bundled:llama", root / "fp32.onnx", limit=1)
    assert report["weight_ratio"] is None and report["verify"]["max_abs_logit_error"] < 1e-3
    return root


def test_cli_bench_ort_and_torch_with_json(artifacts, tmp_path):
    for target in (artifacts / "w4.onnx", artifacts / "w4"):
        out = tmp_path / f"{target.name}.json"
        result = CliRunner().invoke(main, ["bench", str(target), "--duration", "0.2", "--warm-up", "20",
                                           "--seq-len", "32", "--export-json", str(out)])
        assert result.exit_code == 0, result.output
        assert "Throughput:" in result.stdout and "percentile(99%)" in result.stdout
        data = json.loads(out.read_text())
        assert data["inferences"] >= 10 and data["total_host_walltime_s"] >= 0.2  # trtexec: iterations and duration
        # throughput is inferences over walltime, in tokens: 32 per prefill of batch 1
        assert data["throughput_qps"] == pytest.approx(data["inferences"] / data["total_host_walltime_s"])
        assert data["throughput_tokens_per_s"] == pytest.approx(32 * data["throughput_qps"])
        # every timed inference happened inside the measured walltime
        assert data["latency_ms"]["mean"] * data["inferences"] <= data["total_host_walltime_s"] * 1e3
        printed = float(result.stdout.split("Throughput: ")[1].split()[0])
        assert printed == pytest.approx(data["throughput_qps"], rel=1e-4)


def test_cli_bench_compare(artifacts, tmp_path):
    targets = [artifacts / "fp32.onnx", artifacts / "w4.onnx", artifacts / "w8a8.onnx", artifacts / "w4"]
    result = CliRunner().invoke(main, ["bench", "--compare", *map(str, targets), "--duration", "0.1", "--warm-up", "0",
                                       "--seq-len", "16", "--export-json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    table = result.stdout.strip().splitlines()[-4:]
    measured = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["target"] for r in measured] == [str(t) for t in targets]
    base = measured[0]["latency_ms"]["mean"]
    for row, target, data in zip(table, targets, measured):  # each row: its own target, its speed over the first's
        assert target.name in row
        assert row.split()[-1] == ratio(base / data["latency_ms"]["mean"])
    assert table[0].rstrip().endswith("1.00x")


def test_cli_bench_bad_target(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_ort_runner_benchmarks_the_exported_model(artifacts):
    """With optimizations on, the session must still compute the checkpoint's model: the
    MatMulNBits fusion of INT4 weights runs at fp32 accuracy, not int8 activations."""
    import numpy as np

    from lrq_deploy.bench.runners import OrtRunner

    optimized = OrtRunner(artifacts / "w4.onnx", batch=2, seq_len=64)
    plain = OrtRunner(artifacts / "w4.onnx", batch=2, seq_len=64, optimize=False)
    feeds = optimized.feeds
    a, b = optimized.session.run(None, feeds)[0], plain.session.run(None, feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).all()
