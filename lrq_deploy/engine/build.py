"""`lrq build-engine`: ONNX graph -> serialized TensorRT engine.

The graph is checked here (requirements.py); TensorRT then parses and builds it in a child
process (`lrq_deploy.engine.worker` running builder.py), so that a TensorRT abort becomes one error line and the
process can be given the environment its flavour needs (see Flavour.build_process_env).
`lrq`-domain nodes become layers of our plugins (plugins/trt_plugins.py), registered in
the child before parsing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from lrq_deploy.atomic import (
    OutputKind, check_distinct_outputs, check_output_file, claim_output, is_json_of, output_scope,
    remove_stale_temporaries, temporary_path, write_json,
)
from lrq_deploy.engine.requirements import BuildOptions, graph_requirements, plugin_kind, profile_shapes
from lrq_deploy.progress import step
from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.engine_record import ENGINE_RECORD, build_record, record_path
from lrq_deploy.runtime.flavours import Flavour, load_flavour

VERIFY_MIN_COSINE = 0.999
OUTPUT = OutputKind("TensorRT engine", directory=False,
                    recognise=lambda p: is_json_of(record_path(Path(p)), "format", ENGINE_RECORD))


@output_scope()
def build_engine(onnx_path: Path, out: Path, options: BuildOptions) -> dict:
    """Build `out` from `onnx_path`; writes the engine and its build record OUT.json (what
    `lrq info` and the engine loader check) atomically."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise LrqError(f"ONNX file {onnx_path} does not exist")
    claim_output(out, OUTPUT, options.force, inputs=[onnx_path], option="-o")
    check_distinct_outputs({"-o": out, "--timing-cache": options.timing_cache})
    if options.timing_cache is not None:
        check_output_file(options.timing_cache, True, inputs=[onnx_path, out], option="--timing-cache")
    requirements = graph_requirements(onnx_path, options.precision, options.plugins)
    flavour = load_flavour(options.flavour)
    flavour.compute_capabilities(options.compute_capabilities)  # unknown targets fail before the child starts
    if options.timing_cache is not None and flavour.strongly_typed_only:
        raise LrqError(f"--timing-cache does nothing with {flavour.name} (TensorRT for RTX keeps no timing cache); "
                       "leave it out, or build with the tensorrt flavour")
    if options.triton_repo is not None:
        _check_triton_target(options, flavour, out, requirements)
    if options.verify:
        _check_gpu_for_verify()
    remove_stale_temporaries(out)
    staging = temporary_path(out, "-build")
    try:
        with step(f"building the engine with {flavour.name}"):
            report = {**_build_in_child(flavour, onnx_path, staging, options, requirements), **requirements}
        report["engine"] = str(out)
        report["profile"] = {name: [list(shape) for shape in shapes]
                             for name, shapes in profile_shapes(requirements["inputs"], options.shapes).items()}
        if options.verify:
            with step("verifying the engine against onnxruntime"):
                report["verify"] = _verify(staging, onnx_path, options, flavour.name)
        record = build_record(staging, onnx_path, options, flavour, report)
        write_json(record_path(out), record)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    if options.triton_repo is not None:
        from lrq_deploy.serve.triton import engine_repository

        report["triton_repo"] = str(engine_repository(out, record, options.triton_repo, force=options.force))
    return report


def _check_triton_target(options: BuildOptions, flavour: Flavour, out: Path, requirements: dict) -> None:
    """What --triton-repo would refuse after the build, refused before it."""
    from lrq_deploy.serve.triton import check_plugins_servable, check_repository_target, model_name_for

    if flavour.name != "tensorrt":
        raise LrqError("Triton's TensorRT backend runs engines of full TensorRT; --triton-repo needs "
                       "--flavour tensorrt (this build uses TensorRT for RTX)")
    check_plugins_servable(plugin_kind(flavour, requirements))
    check_distinct_outputs({"-o": out, "--triton-repo": Path(options.triton_repo) / model_name_for(out)})
    check_repository_target(options.triton_repo, model_name_for(out), options.force)


def _check_gpu_for_verify() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LrqError("--verify runs the engine, which needs a CUDA GPU; build without --verify on this machine")


def _verify(out: Path, onnx_path: Path, options: BuildOptions, flavour: str) -> dict:
    """Engine vs onnxruntime; an engine that disagrees is removed, not left looking valid."""
    from lrq_deploy.engine.verify import verify_engine

    results = verify_engine(out, onnx_path, options.shapes, flavour)
    worst = min(results.items(), key=lambda kv: kv[1]["cosine"])
    if worst[1]["cosine"] < VERIFY_MIN_COSINE:
        raise LrqError(f"the engine disagrees with onnxruntime on {worst[0]} (cosine {worst[1]['cosine']:.6f} < "
                       f"{VERIFY_MIN_COSINE}, max abs error {worst[1]['max_abs_error']:.3g}); no engine written")
    return results


def _build_in_child(flavour: Flavour, onnx_path: Path, out: Path, options: BuildOptions, requirements: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrq-build-") as scratch:
        report_path = Path(scratch) / "report.json"
        request = {"onnx": str(onnx_path), "out": str(out), "report": str(report_path), "flavour": flavour.name,
                   "options": json.loads(json.dumps(asdict(options), default=str)), "requirements": requirements}
        proc = subprocess.run(
            [sys.executable, "-m", "lrq_deploy.engine.worker"], input=json.dumps(request),
            capture_output=True, text=True, env=flavour.build_process_env(Path(scratch)),
        )
        if proc.returncode != 0 or not report_path.is_file():
            raise LrqError(_child_failure(proc, onnx_path))
        return json.loads(report_path.read_text())


def _child_failure(proc: subprocess.CompletedProcess, onnx_path: Path) -> str:
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("error: ")]
    if own:
        return own[-1].removeprefix("error: ")
    last = lines[-1] if lines else "no output"
    return f"TensorRT stopped while building {onnx_path} (exit status {proc.returncode}): {last}"
