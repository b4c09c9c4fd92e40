"""The `lrq` command line. Each command parses options and calls one library function."""

from __future__ import annotations

import errno
import json
import math
import sys
from functools import wraps
from pathlib import Path

import click
from click.core import ParameterSource

from lrq_deploy.calib.registry import ROTATIONS, method_names, option_fields
from lrq_deploy.quant.scheme import ACT_BITS, FORMATS, KV_FORMATS, PRESETS, WEIGHT_BITS
from lrq_deploy.errors import LrqError


def clean_errors(fn):
    """Report every failure as one line on stderr with exit status 1 (130 on Ctrl-C), never a
    traceback; `lrq --debug COMMAND` re-raises so the traceback shows."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if _debug():
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if _debug():
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(1)

    return wrapper


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


OUT_OF_MEMORY = "out of memory; use smaller --batch-size / --seq-len / --nsamples, or --offload"


def _one_line(exc: Exception) -> str:
    if isinstance(exc, LrqError):
        return str(exc)
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__ or "can't allocate memory" in str(exc):
        return OUT_OF_MEMORY
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}; no partial output was kept: free space and rerun"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (f"unexpected {type(exc).__name__}: {detail[:300]} "
            "(rerun with lrq --debug ... for the traceback, and please report it)")


class NonEmptyPath(click.Path):
    """A path option or argument; an empty string is refused (click would read it as ".")."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name a file or directory", param, ctx)
        return super().convert(value, param, ctx)


PATH = NonEmptyPath(path_type=Path)


class OneLineErrors(click.Group):
    """Usage errors as one line too (click's default prints the usage, a hint and the error)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrq-deploy")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or step lines (they show only on a terminal).")
def main(debug, quiet):
    """lrq-deploy: low-bit post-training quantization from PyTorch to deployment."""
    if quiet:
        from lrq_deploy.progress import set_quiet

        set_quiet(True)


def method_options(command):
    """One option per method setting, from the registered methods' options dataclasses; each
    option's help names the methods that take it (others refuse it when given)."""
    for name, (default, help_text, owners) in reversed(option_fields().items()):
        flag = "--" + name.replace("_", "-")
        note = f" [{', '.join(owners)}]"
        if isinstance(default, bool):
            flags = f"{flag}/--no-{flag[2:]}" if default else flag  # an option on by default can be turned off
            command = click.option(flags, name, is_flag=True, default=default, help=help_text + note)(command)
        else:
            command = click.option(flag, name, type=type(default), default=default, show_default=True,
                                   help=help_text + note)(command)
    return command


@main.command(short_help="Quantize a model and write a quantized checkpoint.")
@click.argument("model", required=False)
@click.option("-o", "--out", "out", type=PATH, required=True, help="Checkpoint directory to write.")
@click.option("--wbits", type=int, default=4, show_default=True, help=f"Weight bits: {', '.join(map(str, WEIGHT_BITS))}.")
@click.option("--abits", type=int, default=16, show_default=True, help=f"Activation bits: {', '.join(map(str, ACT_BITS))}.")
@click.option("--group-size", type=int, default=None, help="Weight group size (default: per output channel).")
@click.option("--symmetric/--asymmetric", default=False, show_default=True, help="Weight quantization mapping.")
@click.option("--act-asym/--act-sym", "act_asym", default=None,
              help="Per-token activations: asymmetric (each token's [min, max] with a zero point; the default "
                   "when --abits < 16) or symmetric (+-max, for kernels that prefer it).")
@click.option("--wformat", type=click.Choice(FORMATS), default="int", show_default=True,
              help="Weight number grid: integers, FP8 E4M3 (per output channel), NVFP4 (E2M1, blocks of 16 with E4M3 "
                   "scales) or MXFP4 (E2M1, blocks of 32 with power-of-two scales); a float grid sets its bits and block.")
@click.option("--aformat", type=click.Choice(FORMATS), default="int", show_default=True,
              help="Activation number grid: per-token integers, or the weights' float grid (static calibrated scale).")
@click.option("--kv-cache", "kv_cache", type=click.Choice(KV_FORMATS), default="none", show_default=True,
              help="Store attention's key/value cache quantized: int8 / int4 (per token and head, asymmetric, "
                   "dynamic) or fp8 (E4M3, one static scale per layer for keys and one for values, calibrated). "
                   "Keys are quantized after rotary; calibration and evaluation run with the quantized cache.")
@click.option("--kv-rotate", "kv_rotate", is_flag=True,
              help="With --kv-cache: keys multiplied by a Hadamard matrix of the head size before they are quantized "
                   "(the rotation methods' R3; queries are rotated alike, so attention is unchanged up to the "
                   "rounding). Spreads the outlier channels rotary leaves in the keys: what a 4-bit cache needs.")
@click.option("--scheme", type=click.Choice(list(PRESETS)), default=None,
              help="A named float scheme: fp8 (W8A8 E4M3), nvfp4 / mxfp4 (W4A4), w8a16-fp8, w4a16-nvfp4, w4a16-mxfp4.")
@click.option("--scheme-for", "scheme_for", multiple=True, metavar="PATTERN=SCHEME",
              help="Another scheme for the modules PATTERN matches (a glob over full module names or their last "
                   "components): 'lm_head=w4a16-g128' (the head quantized too), 'down_proj=w4a16', "
                   "'model.layers.0.*=none' (kept in floating point). Repeatable; the first matching rule wins.")
@click.option("--recipe", type=PATH, default=None,
              help="A YAML recipe of per-layer schemes: 'layers: {PATTERN: SCHEME}' and optionally 'default: SCHEME' "
                   "(replacing the command line's scheme); --scheme-for rules come before the file's.")
@click.option("--effective-bits", type=float, default=None,
              help="Choose a scheme per linear among --candidates so that they average at most this many bits per "
                   "weight (codes, group scales and zero points counted): each linear's sensitivity is the model "
                   "output's change with that linear alone rounded under each candidate; the table goes into the "
                   "checkpoint's manifest. Rules of --scheme-for / --recipe stay as given.")
@click.option("--candidates", default=None,
              help="--effective-bits: the weight-only schemes to choose from, comma-separated "
                   "[default: w2a16-g64,w3a16,w3a16-g64,w4a16,w4a16-g64,w8a16].")
@click.option("--method", type=click.Choice(method_names()), default="rtn", show_default=True)
@click.option("--calib-data", type=PATH, default=None, help="Calibration data: a UTF-8 text file (language models) or an image folder DIR/CLASS/IMAGE (ViT).")
@click.option("--nsamples", type=int, default=32, show_default=True, help="Calibration samples.")
@click.option("--seq-len", "seqlen", type=int, default=None,
              help="Tokens per calibration sample (language models; default 256).")
@click.option("--seqlen", "seqlen_alias", type=int, default=None, hidden=True)
@method_options
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per optimizer step.")
@click.option("--quantize-head", is_flag=True,
              help="Also quantize the output head (lm_head / classifier) with the blocks' scheme and the method's "
                   "rounding; a head tied to the embeddings is untied (embeddings stay full precision).")
@click.option("--rotate", type=click.Choice(ROTATIONS), default="none", show_default=True,
              help="Rotate the model first (QuaRot): R1 on the residual stream and R2 per head folded into the "
                   "weights, a Hadamard transform online before down_proj. R1 / R2: hadamard (Sylvester / Paley), "
                   "random-hadamard (the same after random signs, QuaRot's) or orthogonal (Haar-random); the "
                   "random ones seeded by --seed.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--run-dir", type=PATH, default=None, help="Per-block learned parameters (default OUT.run).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run; settings not given are taken from the run directory.")
@click.option("--offload", type=click.Choice(["memory", "disk"]), is_flag=False, flag_value="memory", default=None,
              help="Big models in small memory: each block is read from the safetensors shards when its turn comes; "
                   "model and block inputs stay in CPU memory (--offload disk: block inputs in files).")
@click.option("--distributed", is_flag=True,
              help="Data-parallel over the ranks of a torchrun job (gloo on CPU, NCCL on GPUs); rank 0 writes.")
@click.option("--trust-remote-code", is_flag=True, help="Allow an HF model directory to run its own Python code.")
@click.option("--revision", default=None,
              help="Branch, tag or commit of a Hugging Face model id (same as MODEL@REVISION).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output directory or an unfinished run.")
@clean_errors
def calibrate(**options):
    """Quantize MODEL (a Hugging Face id ORG/NAME[@REVISION], an HF directory, a timm directory,
    timm:NAME@WEIGHTS.safetensors, bundled:llama or bundled:vit; default bundled:llama) and write a
    checkpoint to OUT. Model ids are fetched into the Hugging Face cache (safetensors and JSON
    files only); with HF_HUB_OFFLINE=1 only the cache is read."""
    from lrq_deploy.calib import calibrate_from_options
    from lrq_deploy.calib.progress import ConsoleProgress

    alias = options.pop("seqlen_alias")
    if alias is not None:
        options["seqlen"] = alias
    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    options["given"] = given | ({"seqlen"} if alias is not None else set())
    summary = calibrate_from_options(options, progress=ConsoleProgress)
    if summary.get("already_complete"):
        click.echo(f"{summary['checkpoint']} is complete already ({summary['method']} {summary['scheme']}, same model, "
                   "data and settings, files intact): nothing to resume")
    elif summary["rank"] == 0:
        click.echo(f"wrote {summary['checkpoint']} ({summary['method']} {summary['scheme']})")


def comparison_line(name: str, c: dict) -> str:
    return (f"{name}: max |error| {c['max_abs_error']:.3e}, mean |error| {c['mean_abs_error']:.3e}, "
            f"max rel error {c['max_rel_error']:.3e}, cosine {c['cosine']:.6f}, argmax agreement {c['argmax_agreement']:.4%}")


@main.command(name="eval", short_help="Compare full-precision and quantized accuracy.")
@click.argument("target", type=PATH)
@click.option("--metric", "--task", "metric", type=click.Choice(["ppl", "top1", "cosine"]), default=None,
              help="Metric (default: the model's own); --task is its earlier name.")
@click.option("--data", type=PATH, default=None,
              help="Evaluation text (default: WikiText-2 test) or, for the ViT, an image folder DIR/CLASS/IMAGE.")
@click.option("--limit", type=int, default=None, help="Evaluate at most this many windows (quick checks).")
@click.option("--seq-len", type=int, default=None, help="Perplexity window in tokens (default 256).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["reference", "kernels", "torch"]), default="reference", show_default=True,
              help="reference: dequantize-then-matmul in PyTorch; kernels: the Triton kernels (torch: the same, "
                   "its earlier name).")
@click.option("--fp-cache/--no-fp-cache", default=True, show_default=True,
              help="Read the full-precision figure from an earlier evaluation of the same source model, data and "
                   "settings (kept in ~/.cache/lrq/fp-eval or $LRQ_CACHE/fp-eval) instead of recomputing it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: fp and quant ({metric: value}), fp_cached, and agreement for families "
                   "judged by their outputs.")
@click.option("--tasks", default=None,
              help="lm-evaluation-harness tasks instead of the metric, comma-separated (piqa,arc_easy,...; needs the "
                   "lmeval extra). --limit then caps the documents per task.")
@click.option("--task-path", type=PATH, default=None, help="A folder of your own lm-eval task YAML files.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per lm-eval task (default: the task's).")
@click.option("--onnx", "onnx_graph", type=PATH, default=None,
              help="With --tasks: score the quantized side with this exported graph (onnxruntime) instead of torch.")
@clean_errors
def eval_(target, metric, data, limit, seq_len, device, backend, fp_cache, as_json, tasks, task_path, num_fewshot,
          onnx_graph):
    """Evaluate checkpoint TARGET and its source model side by side."""
    from lrq_deploy.eval import EvalOptions, evaluate_checkpoint

    backend = "torch" if backend == "kernels" else backend
    if tasks or task_path or num_fewshot is not None or onnx_graph:
        return _eval_tasks(target, tasks, task_path, num_fewshot, onnx_graph, limit, device, backend, as_json,
                           refused={"--metric": metric, "--data": data, "--seq-len": seq_len})
    options = EvalOptions(metric, data, limit, device, backend=backend, seq_len=seq_len, fp_cache=fp_cache)
    result = evaluate_checkpoint(target, options)
    if as_json:
        click.echo(json.dumps(result))
        return
    metric, label = result["metric"], f"{result['method']} {result['scheme']}"
    if metric in result["quant"]:
        fp_label = "full precision" + (" (cached)" if result["fp_cached"] else "")
        click.echo(f"{'model':<28}{metric:>12}")
        click.echo(f"{fp_label:<28}{result['fp'][metric]:>12.4f}")
        click.echo(f"{label:<28}{result['quant'][metric]:>12.4f}")
    agreement = result.get("agreement")
    if agreement:
        top1 = f", top-1 agreement {agreement['top1_agreement']:.2%}" if "top1_agreement" in agreement else ""
        click.echo(f"{label} vs full precision over {agreement['rows']} outputs: cosine mean "
                   f"{agreement['cosine_mean']:.5f}, 5th percentile {agreement['cosine_p5']:.5f}{top1}")


def _eval_tasks(target, tasks, task_path, num_fewshot, onnx_graph, limit, device, backend, as_json, refused):
    from lrq_deploy.eval.tasks import TaskOptions, evaluate_tasks

    if not tasks:
        raise LrqError("--task-path, --num-fewshot and --onnx go with --tasks (name the lm-eval tasks to run)")
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise LrqError(f"{given[0]} does not apply to lm-eval tasks (--tasks)")
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    result = evaluate_tasks(target, TaskOptions(names, task_path, limit, num_fewshot, onnx_graph, device, backend))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"lm-eval {result['lm_eval_version']}, quantized side scored by {result['scorer']}"
               + (f", at most {limit} documents per task" if limit else ""))
    click.echo(f"{'task':<24}{'metric':<12}{'full precision':>20}{result['method'] + ' ' + result['scheme']:>24}")
    for task, sides in result["tasks"].items():
        for name in sides["quant"]:
            if name.endswith("_stderr"):
                continue
            cells = [_with_stderr(sides.get(side, {}), name) for side in ("fp", "quant")]
            click.echo(f"{task:<24}{name:<12}{cells[0]:>20}{cells[1]:>24}")


def _with_stderr(metrics: dict, name: str) -> str:
    if name not in metrics:
        return "-"
    stderr = metrics.get(name + "_stderr")
    return f"{metrics[name]:.4f}" + ("" if stderr is None or math.isnan(stderr) else f" ± {stderr:.4f}")


@main.command(short_help="Export a checkpoint to ONNX (onnxruntime or TensorRT flavour), onnxruntime-genai or vLLM.")
@click.argument("checkpoint")
@click.option("--onnx", "onnx_path", type=PATH, default=None, help="ONNX file to write.")
@click.option("--vllm", "vllm_dir", type=PATH, default=None,
              help="Instead: a Hugging Face directory in the compressed-tensors format (vLLM, transformers).")
@click.option("--genai", "genai_dir", type=PATH, default=None,
              help="Instead: a directory onnxruntime-genai generates with (decoder graph with its KV cache, "
                   "genai_config.json, tokenizer).")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort: standard ops only; trt: TensorRT native INT4 or lrq plugin nodes.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the minimum the weights need).")
@click.option("--batch", type=int, default=None, help="Static batch size (default: dynamic axes).")
@click.option("--seq-len", type=int, default=None, help="Static sequence length (default: dynamic axes).")
@click.option("--limit", type=int, default=None, help="Verification samples (default 16 windows / all digits).")
@click.option("--with-past", is_flag=True, help="Decoder graph with KV-cache inputs/outputs (prefill and decode).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--ort-int8-activations", is_flag=True,
              help="Declare the graph for onnxruntime's MatMulNBits at accuracy level 4 (int8 activations per block "
                   "of K: faster on CPUs, other numerics; verified with its own metric). Group-wise W4A16 only.")
@click.option("--triton-repo", type=PATH, default=None,
              help="Also write a Triton Inference Server model repository (DIR/NAME/config.pbtxt, DIR/NAME/1/).")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="--target ort: quantized linears that read one input (q/k/v, gate/up) as one GEMM (exact), "
                   "RMSNorm in the form onnxruntime fuses into one kernel.")
@click.option("--contrib-ops/--standard-ops", default=True, show_default=True,
              help="--target ort: onnxruntime's contrib kernels where they compute the same: residual add + RMSNorm "
                   "in one node, and with --with-past each attention as GroupQueryAttention (rotary, KV cache, grouped "
                   "heads in one node); --standard-ops keeps every node in the ONNX standard.")
@click.option("--cpu-kernels", is_flag=True,
              help="--target ort: lrq's own CPU GEMM for 4-bit weights with exact activations (op ai.lrq.cpu::MatMulInt4, "
                   "about 2x onnxruntime's MatMulNBits in decode; same numerics). The graph then needs lrq's kernel "
                   "library, which lrq's sessions register (built on first use with the machine's C++ compiler).")
@click.option("--allow-outside-tolerance", is_flag=True,
              help="Keep a graph whose verification against torch fails its tolerance (recorded in the graph's "
                   "metadata and verification record); without it such an export fails and writes nothing.")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["int8", "int4"]), default=None,
              help="--onnx: quantize the KV cache of a checkpoint calibrated without one (int8 / int4 per token and "
                   "head: nothing to calibrate; fp8 needs calibrated scales: lrq calibrate --kv-cache fp8).")
@click.option("--force", is_flag=True, help="Overwrite an existing lrq output of the same kind.")
@clean_errors
def export(checkpoint, onnx_path, vllm_dir, genai_dir, target, opset, batch, seq_len, limit, with_past, no_verify,
           ort_int8_activations, triton_repo, fuse, contrib_ops, cpu_kernels, allow_outside_tolerance, kv_cache, force):
    """Export CHECKPOINT to an ONNX graph and verify it against the torch reference.

    CHECKPOINT may also be a full-precision model (bundled:llama, an HF or timm directory),
    exported unquantized as the baseline for benchmarks."""
    from lrq_deploy.export import ExportOptions, export_onnx

    if sum(out is not None for out in (onnx_path, vllm_dir, genai_dir)) != 1:
        raise LrqError("name one output: --onnx FILE, --genai DIR or --vllm DIR")
    if kv_cache and onnx_path is None:
        raise LrqError(f"--kv-cache {kv_cache} on export makes --onnx graphs; onnxruntime-genai and vLLM cannot read "
                       "an int8 / int4 cache")
    if vllm_dir is not None:
        from lrq_deploy.export.vllm import export_vllm

        report = export_vllm(Path(checkpoint), vllm_dir, force=force)
        cache = ", FP8 KV cache (kv_cache_scheme, k_scale / v_scale)" if report["kv_cache"] == "fp8" else ""
        click.echo(f"wrote {report['vllm']} ({report['scheme']}, compressed-tensors {report['format']}, "
                   f"{report['quantized_linears']} quantized linears{cache}; weights checked after reloading)")
        return
    options = ExportOptions(target, opset, batch, seq_len, not no_verify, limit, with_past, force, ort_int8_activations,
                            triton_repo, fuse, contrib_ops, cpu_kernels=cpu_kernels,
                            allow_outside_tolerance=allow_outside_tolerance, kv_cache=kv_cache)
    if genai_dir is not None:
        from lrq_deploy.export.genai import export_genai

        report = export_genai(checkpoint, genai_dir, options)
    else:
        report = export_onnx(checkpoint, onnx_path, options)
    ratio = report["weight_ratio"]
    sizes = (f"; quantized linear weights {report['quantized_weight_bytes'] / 1e6:.2f} MB = {ratio:.3f} x FP16"
             if ratio else "; full precision")
    click.echo(f"wrote {report['onnx']} (target {target}, opset {report['opset']}, {report['file_bytes'] / 1e6:.2f} MB{sizes})")
    if report.get("triton_repo"):
        click.echo(f"wrote Triton model repository entry {report['triton_repo']}")
    if report.get("cpu_kernel_linears"):
        click.echo(f"lrq CPU kernel: {report['cpu_kernel_linears']} linears as ai.lrq.cpu::MatMulInt4")
        if report.get("cpu_kernel_code") in ("avx2", "portable"):
            click.echo(f"note: this CPU has no AVX-512, so lrq's CPU kernel runs its {report['cpu_kernel_code']} code "
                       "here, which may be slower than onnxruntime's MatMulNBits; "
                       "the graph is built for AVX-512 CPUs")
    verify = report.get("verify")
    if verify:
        if verify["metric"]:
            click.echo(f"{'':<14}{'torch':>12}{'onnxruntime':>14}")
            click.echo(f"{verify['metric']:<14}{verify['torch']:>12.4f}{verify['onnxruntime']:>14.4f}"
                       f"   (onnxruntime: {verify['onnxruntime_numerics']})")
        from lrq_deploy.export.verify import verification_line

        click.echo(verification_line(verify))
    generation = report.get("verify_generation")
    if generation:
        verdict = "same tokens" if generation["match"] else "DIFFERENT tokens"
        click.echo(f"greedy decoding with the KV cache, onnxruntime vs torch: {verdict}")
    if genai_dir is not None and not no_verify:
        click.echo(genai_line(report["genai_generation"]))


def genai_line(generation: dict | None) -> str:
    if generation is None:
        from lrq_deploy.export.genai import INSTALL_HINT

        return f"onnxruntime-genai is not installed: generation with it not checked ({INSTALL_HINT})"
    tokens = len(generation["torch"])
    if generation["match"]:
        return f"onnxruntime-genai {generation['onnxruntime_genai_version']}: {tokens} greedy tokens, same as torch"
    first = next(i for i, (a, b) in enumerate(zip(generation["onnxruntime_genai"], generation["torch"])) if a != b)
    return (f"onnxruntime-genai {generation['onnxruntime_genai_version']}: greedy tokens DIFFER from torch's "
            f"from token {first + 1} of {tokens}")


@main.command(name="build-engine", short_help="Build a TensorRT engine from an lrq ONNX graph.")
@click.argument("onnx_path", type=PATH)
@click.option("-o", "--out", type=PATH, required=True, help="Engine file to write.")
@click.option("--int4", "precision", flag_value="int4", default=True, help="INT4 weights (native block DQ). Default.")
@click.option("--fp8", "precision", flag_value="fp8", help="FP8 Q/DQ graph.")
@click.option("--fp4", "precision", flag_value="fp4", help="NVFP4 graph (Blackwell).")
@click.option("--fp16", "precision", flag_value="fp16", help="Unquantized graph.")
@click.option("--min-shapes", default=None, help="name:DxD,... (with --opt-shapes and --max-shapes).")
@click.option("--opt-shapes", default=None)
@click.option("--max-shapes", default=None)
@click.option("--timing-cache", type=PATH, default=None, help="Read and update this timing cache.")
@click.option("--workspace", type=int, default=None, help="Workspace limit in MiB.")
@click.option("--flavour", type=click.Choice(["tensorrt", "tensorrt_rtx"]), default=None, help="Default: the one installed.")
@click.option("--sm", "sm", multiple=True, help="Target compute capability (tensorrt_rtx), e.g. --sm 89 --sm 120.")
@click.option("--plugins/--no-plugins", default=True, show_default=True,
              help="Map lrq-domain nodes (W4A4, W2A16, asymmetric W4A16) to the lrq TensorRT plugins.")
@click.option("--verify", is_flag=True, help="Run the engine against onnxruntime on the same inputs (needs a GPU).")
@click.option("--triton-repo", type=PATH, default=None,
              help="Also write a Triton Inference Server model repository (full TensorRT engines).")
@click.option("--force", is_flag=True, help="Overwrite an existing engine file.")
@clean_errors
def build_engine(onnx_path, out, precision, min_shapes, opt_shapes, max_shapes, timing_cache, workspace, flavour, sm, plugins,
                 verify, triton_repo, force):
    """Build a TensorRT engine from ONNX_PATH (exported with lrq export --target trt)."""
    from lrq_deploy.engine import BuildOptions, build_engine as build, parse_shapes

    lows, opts, highs = parse_shapes(min_shapes), parse_shapes(opt_shapes), parse_shapes(max_shapes)
    if not (lows.keys() == opts.keys() == highs.keys()):
        raise LrqError("--min-shapes, --opt-shapes and --max-shapes must name the same inputs")
    shapes = {name: (lows[name], opts[name], highs[name]) for name in lows}
    options = BuildOptions(precision, shapes, timing_cache, workspace, flavour, list(sm), plugins, verify, force, triton_repo)
    report = build(onnx_path, out, options)
    layers = ", ".join(f"{k.lower()} {v}" for k, v in sorted(report["layers"].items(), key=lambda kv: -kv[1])[:6])
    plugins_line = f"; lrq plugin layers ({report['plugins']}): {report['layers']['PLUGIN_V3']}" if report["plugins"] else ""
    click.echo(f"wrote {report['engine']} ({report['flavour']}, {report['bytes'] / 1e6:.2f} MB; layers: {layers}{plugins_line})")
    if report.get("triton_repo"):
        click.echo(f"wrote Triton model repository entry {report['triton_repo']}")
    for name, figures in report.get("verify", {}).items():
        click.echo("verify vs onnxruntime, " + comparison_line(name, figures))


@main.command(short_help="Measure latency and throughput (trtexec-style) of engines, ONNX graphs, checkpoints.")
@click.argument("targets", nargs=-1, required=True, type=PATH)
@click.option("--backend", type=click.Choice(["trt", "ort", "torch"]), default=None,
              help="Default: from the target (.engine: trt, .onnx: ort, checkpoint directory: torch).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sequence (KV-cache length for decode graphs).")
@click.option("--warm-up", "warm_up", type=float, default=200.0, show_default=True, help="Warm-up time in ms.")
@click.option("--iterations", type=int, default=10, show_default=True,
              help="Minimum number of inferences (with --decode: timed generations, default 3).")
@click.option("--duration", type=float, default=3.0, show_default=True, help="Minimum measuring time in seconds.")
@click.option("--percentile", "percentiles", default="90,95,99", show_default=True, help="Comma-separated percentiles.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of onnxruntime and torch (default: theirs); recorded in the figures.")
@click.option("--no-data-transfers", is_flag=True, help="Keep inputs and outputs on the device (no H2D/D2H).")
@click.option("--decode", is_flag=True, help="Generation speed: prompt, then tokens one at a time with a KV cache "
                                             "(checkpoints, HF directories, --with-past ONNX graphs).")
@click.option("--prompt-len", type=int, default=128, show_default=True, help="With --decode: prompt tokens.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="With --decode: tokens generated.")
@click.option("--prefill-chunk", type=int, default=4096, show_default=True,
              help="With --decode: prompts longer than this are prefilled in pieces of it, each extending the cache.")
@click.option("--compare", is_flag=True, help="Measure several targets; print one table with ratios to the first.")
@click.option("--export-json", type=PATH, default=None, help="Write the figures as JSON.")
@click.option("--export-times", type=PATH, default=None, help="Write per-inference timings as JSON.")
@click.option("--force", is_flag=True, help="Overwrite existing --export-json / --export-times files written by lrq bench.")
@clean_errors
def bench(targets, backend, batch, seq_len, warm_up, iterations, duration, percentiles, device, threads,
          no_data_transfers, decode, prompt_len, new_tokens, prefill_chunk, compare, export_json, export_times, force):
    """Benchmark TARGETS (one, or several with --compare)."""
    from lrq_deploy.bench import bench as run, bench_compare, bench_decode
    from lrq_deploy.bench.api import BenchOptions
    from lrq_deploy.bench.decode import DecodeOptions, decode_comparison, decode_summary
    from lrq_deploy.bench.report import comparison, summary

    try:
        points = tuple(float(p) for p in percentiles.split(","))
    except ValueError:
        raise LrqError(f"--percentile takes comma-separated numbers, got {percentiles!r}") from None
    refuse_unused_options(decode, compare)
    if compare and len(targets) < 2:
        raise LrqError("--compare needs at least two targets")
    if not compare and len(targets) != 1:
        raise LrqError("give one target, or several with --compare")
    if decode:
        explicit = click.get_current_context().get_parameter_source("iterations") is not ParameterSource.DEFAULT
        options = DecodeOptions(batch, prompt_len, new_tokens, iterations if explicit else 3, points, device, threads,
                                prefill_chunk)
        one, show, table = (lambda t, o, j: bench_decode(t, o, j, force)), decode_summary, decode_comparison
    else:
        options = BenchOptions(backend, batch, seq_len, warm_up, iterations, duration, points, device,
                               not no_data_transfers, threads)
        one, show, table = (lambda t, o, j: run(t, o, j, export_times, force)), summary, comparison
    if compare:
        results = bench_compare(list(targets), options, export_json, force)
        click.echo("\n\n".join(show(result) for _, result in results) + "\n")
        click.echo(table(results))
        return
    click.echo(show(one(targets[0], options, export_json)))


def refuse_unused_options(decode: bool, compare: bool) -> None:
    """Options that would do nothing in this combination are refused, not silently ignored."""
    ctx = click.get_current_context()
    given = {name for name in ctx.params if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if decode:
        problems = [f"{flag(n)} does nothing with --decode" for n in
                    ("backend", "warm_up", "duration", "no_data_transfers", "seq_len", "export_times") if n in given]
    else:
        problems = [f"{flag(n)} applies only with --decode" for n in ("prompt_len", "new_tokens", "prefill_chunk") if n in given]
        if compare and "export_times" in given:
            problems.append("--export-times does nothing with --compare (--export-json keeps every target's figures)")
    if problems:
        raise LrqError("; ".join(problems))


@main.command(short_help="Show what a checkpoint, ONNX graph or engine is, and whether it is intact.")
@click.argument("target", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@clean_errors
def info(target, as_json):
    """Describe TARGET (checkpoint directory, .onnx, .engine): format, family, scheme, sizes,
    hashes checked against their records, recorded verification, library versions. Exits with
    status 1 when something does not match its record."""
    from lrq_deploy.info import describe, format_report

    report = describe(target)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))
    if not report["intact"]:
        raise LrqError(f"{target} is not intact: {report['problems'][0]}")


if __name__ == "__main__":
    main()
