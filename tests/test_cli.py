"""The CLI: help, and one clear error line (no traceback, non-zero exit) for each bad input."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli_runner import invoke as run
from lrq_deploy.eval import evaluate_checkpoint
from lrq_deploy.models import load_model


FAST = ["--nsamples", "2", "--seq-len", "16"]




def assert_clean_error(result, fragment):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


def test_help_lists_commands_without_importing_torch():
    out = run("--help").output
    commands = out.split("Commands:")[1].splitlines()
    listed = [line.split()[0] for line in commands if line.startswith("  ") and not line.startswith("   ")]
    assert listed == ["bench", "build-engine", "calibrate", "eval", "export", "info"]
    probe = ("import sys; from click.testing import CliRunner; from lrq_deploy.cli import main; "
             "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0; "
             "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'tensorrt') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"  # lrq --help answers without loading the heavy libraries


def test_missing_model_path(tmp_path):
    assert_clean_error(run("calibrate", tmp_path / "nope", "-o", tmp_path / "o"), "does not exist")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    assert_clean_error(run("calibrate", tmp_path / "m", "-o", tmp_path / "o"), "is not a model directory")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run("calibrate", tmp_path / "m", "-o", tmp_path / "o")
    assert_clean_error(result, "unsupported architecture 'gpt2'")
    for family in ("llama (llama, mistral, qwen2)", "opt (opt)", "bert (bert)", "vit (timm VisionTransformer"):
        assert family in result.output  # the supported families, each with what it accepts


def test_wbits_5(tmp_path):
    assert_clean_error(run("calibrate", "-o", tmp_path / "o", "--wbits", "5"), "wbits must be one of")


def test_group_size_not_dividing(tmp_path, tiny_llama_dir):
    result = run("calibrate", tiny_llama_dir, "-o", tmp_path / "o", "--group-size", "48", "--nsamples", "2", "--seqlen", "16")
    assert_clean_error(result, "group size 48 does not divide")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file(tmp_path, tiny_llama_dir):
    (tmp_path / "empty.txt").write_text("")
    result = run("calibrate", tiny_llama_dir, "-o", tmp_path / "o", "--calib-data", tmp_path / "empty.txt")
    assert_clean_error(result, "is empty")


def test_output_exists(tmp_path, tiny_llama_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert_clean_error(run("calibrate", tiny_llama_dir, "-o", tmp_path / "o"), "not empty (use --force")
    assert (tmp_path / "o" / "keep.txt").exists()


def test_truncated_checkpoint_on_eval(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    ok = run("calibrate", tiny_llama_dir, "-o", out, "--nsamples", "2", "--seqlen", "16")
    assert ok.exit_code == 0, ok.output
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) - 100])
    assert_clean_error(run("eval", out, "--limit", "1"), "model.safetensors does not match manifest.json (size differs)")


def test_eval_missing_checkpoint(tmp_path):
    assert_clean_error(run("eval", tmp_path / "none"), "does not exist")


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lrq_deploy.cli", "calibrate", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: model path {tmp_path / 'nope'} does not exist"]


@pytest.mark.parametrize("method,bits", [("rtn", ["--wbits", "4", "--group-size", "32"]), ("smoothquant", ["--wbits", "8", "--abits", "8"])])
def test_calibrate_then_eval_json(tmp_path, tiny_llama_dir, method, bits):
    out = tmp_path / method
    result = run("calibrate", tiny_llama_dir, "-o", out, "--method", method, *bits, "--nsamples", "2", "--seqlen", "32")
    assert result.exit_code == 0, result.output
    report = json.loads(run("eval", out, "--json", "--limit", "2").stdout)
    assert set(report) >= {"fp", "quant"}
    # the printed figures are the library's: FP perplexity of the source model, and the checkpoint's
    direct = evaluate_checkpoint(out, limit=2, device="cpu")
    assert report["fp"]["ppl"] == direct["fp"]["ppl"] and report["quant"]["ppl"] == direct["quant"]["ppl"]
    fp = load_model(str(tiny_llama_dir))
    assert report["fp"]["ppl"] == pytest.approx(fp.adapter.evaluate(fp.model, fp, None, 2, "cpu")["ppl"], rel=1e-12)
    # quantization moved the model, by little at these bit widths
    assert report["quant"]["ppl"] != report["fp"]["ppl"]
    assert report["quant"]["ppl"] == pytest.approx(report["fp"]["ppl"], rel=0.05)


def test_eval_window_length(tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    assert run("calibrate", tiny_llama_dir, "-o", out, "--wbits", "4", "--nsamples", "2", "--seqlen", "32").exit_code == 0
    short = json.loads(run("eval", out, "--json", "--limit", "2", "--seq-len", "32").stdout)
    long = json.loads(run("eval", out, "--json", "--limit", "2", "--seq-len", "128").stdout)
    assert short["quant"]["ppl"] != long["quant"]["ppl"]  # different windows score different tokens
    assert_clean_error(run("eval", out, "--seq-len", "1"), "--seq-len must lie in 2..256")
    assert_clean_error(run("eval", out, "--seq-len", "4096"), "--seq-len must lie in 2..256")


def test_help_does_not_import_torch():
    """`lrq --help` and argument errors answer at once: the CLI imports torch only inside commands."""
    code = "import sys; from lrq_deploy.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run([sys.executable, "-m", "lrq_deploy.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "calibrate" in proc.stdout


def test_eval_keeps_the_full_precision_figure_of_a_source(tmp_path, tiny_llama_dir, monkeypatch):
    """The FP figure depends on the source model, the data and the settings only: a second
    checkpoint of the same source reads it back; another data file, window or limit computes it."""
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path / "cache"))
    for name, bits in (("a", "4"), ("b", "8")):
        assert run("calibrate", tiny_llama_dir, "-o", tmp_path / name, "--wbits", bits, *FAST).exit_code == 0
    first = json.loads(run("eval", tmp_path / "a", "--json", "--limit", "2").stdout)
    second = json.loads(run("eval", tmp_path / "b", "--json", "--limit", "2").stdout)
    assert not first["fp_cached"] and second["fp_cached"] and second["fp"] == first["fp"]
    fresh = json.loads(run("eval", tmp_path / "b", "--json", "--limit", "2", "--no-fp-cache").stdout)
    assert not fresh["fp_cached"] and fresh["fp"] == first["fp"]  # the cached figure is the figure
    other = json.loads(run("eval", tmp_path / "b", "--json", "--limit", "3").stdout)
    assert not other["fp_cached"] and other["fp"] != first["fp"]
    text = tmp_path / "text.txt"
    text.write_text((tiny_llama_dir / "config.json").read_text() * 20)
    assert not json.loads(run("eval", tmp_path / "b", "--json", "--limit", "2", "--data", text).stdout)["fp_cached"]
    assert "full precision (cached)" in run("eval", tmp_path / "a", "--limit", "2").stdout


def test_resume_of_a_finished_run_does_nothing(tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    assert run("calibrate", tiny_llama_dir, "-o", out, *FAST).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run("calibrate", tiny_llama_dir, "-o", out, *FAST, "--resume")
    assert again.exit_code == 0 and "is complete already" in again.stdout and "nothing to resume" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = run("calibrate", tiny_llama_dir, "-o", out, *FAST[:2], "--seq-len", "24", "--resume")
    assert other.exit_code == 0 and other.stdout.startswith("wrote")  # other settings: calibrated again
