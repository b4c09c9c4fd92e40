"""Public entry point of the calibrate stage: model spec in, quantized checkpoint out."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch

from lrq_deploy.atomic import claim_output, output_scope
from lrq_deploy.calib.auto_scheme import candidate_schemes, search_schemes
from lrq_deploy.calib.blockwise import block_linears, calibrate_model
from lrq_deploy.calib.head import head_of, quantize_head
from lrq_deploy.calib.rundir import RunDir, saved_settings
from lrq_deploy.checkpoint import LAYER_SCHEMES, MANIFEST, OUTPUT, save_checkpoint
from lrq_deploy.calib.registry import CalibConfig, get_method, option_fields
from lrq_deploy.quant.kv_cache import quantize_kv_cache
from lrq_deploy.quant.layer_schemes import BitBudget, LayerSchemes, load_recipe, parse_rule, scheme_label
from lrq_deploy.quant.scheme import FLOAT_FORMATS, QuantScheme
from lrq_deploy.devices import resolve_device
from lrq_deploy.errors import LrqError
from lrq_deploy.data import check_readable_data
from lrq_deploy.models import DEFAULT_MODEL, load_model
from lrq_deploy.models.headers import weight_elements
from lrq_deploy.models.hub import with_revision
from lrq_deploy.progress import step
from lrq_deploy.rotate import plan_rotation, rotate_model


def deterministic_algorithms(device: torch.device) -> None:
    """Same inputs and seed, same checkpoint: on CUDA this needs deterministic kernels (no
    atomics in reductions; cuBLAS with a fixed workspace, which must be configured before
    cuBLAS starts). CPU kernels are deterministic already. Bit-identical results hold for the
    same GPU model and library versions; another GPU runs other kernels (docs/FORMATS.md)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@output_scope()
def calibrate(
    model_spec: str | None,
    out: Path,
    qconfig: QuantScheme | LayerSchemes,
    cconfig: CalibConfig,
    calib_data: Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress=None,
    run_dir: Path | None = None,
    resume: bool = False,
    offload: bool | str = False,
    trust_remote_code: bool = False,
    distributed: bool = False,
) -> dict:
    """Quantize a model with the configured method and write the checkpoint to `out`.

    offload (True / "memory") reads the model block by block and keeps it and the block inputs in
    CPU memory, one block at a time on the device; "disk" keeps the block inputs in files too.
    Learnable methods keep their per-block parameters in `run_dir` (default: OUT.run), so an
    interrupted run continues with resume=True. Outputs are checked before any work starts.
    distributed: one rank of a torchrun job (calib/distributed.py); rank 0 writes.
    qconfig: one scheme, or per-layer schemes (quant/layer_schemes.py: a rule naming the head
    quantizes it too).
    Returns the checkpoint path and per-block errors.
    """
    schemes = qconfig if isinstance(qconfig, LayerSchemes) else LayerSchemes(qconfig)
    qconfig = schemes.default
    if schemes.budget is not None and (offload or distributed):
        raise LrqError("--effective-bits runs the whole model once per linear and candidate: it needs the model in "
                       "memory on one device; drop --offload / --distributed")
    out = Path(out)
    spec = model_spec or DEFAULT_MODEL
    dev = resolve_device(device)
    collective = _collective(distributed, dev)
    claim_output(out, OUTPUT, force or (resume and (out / MANIFEST).is_file()), inputs=[spec, calib_data], option="-o",
                 lock=collective.main, need_bytes=_checkpoint_bytes_at_least(spec, schemes))
    if calib_data is not None:
        check_readable_data(Path(calib_data))
    if resume and not distributed:
        finished = finished_checkpoint(out, spec, schemes, cconfig, calib_data)
        if finished is not None:
            return finished
    dev = collective.own_device(dev)
    runs = None
    if cconfig.spec.resumable:
        runs = RunDir(run_dir or default_run_dir(out), run_settings(spec, schemes, cconfig, calib_data), resume, force)
    collective.barrier()  # every rank has checked the outputs before rank 0 touches them
    deterministic_algorithms(dev)
    torch.manual_seed(cconfig.seed)
    loaded = load_model(spec, "cpu" if offload else dev, trust_remote_code=trust_remote_code, lazy=bool(offload))
    head = _quantized_head(loaded, schemes, cconfig.quantize_head)  # before any block is calibrated
    rotation = plan_rotation(loaded, cconfig.rotate, cconfig.seed)
    rotated = None
    if rotation is not None:
        with step(f"rotating the model ({rotation.kind})"):
            rotated = rotate_model(loaded, rotation)
    quantize_kv_cache(loaded.adapter, loaded.model, schemes.default.kv_cache, schemes.default.kv_rotate)
    batches = loaded.adapter.calibration_batches(loaded, calib_data, cconfig.nsamples, cconfig.seqlen, cconfig.seed)
    given, search = schemes, None
    if schemes.budget is not None:
        schemes, search = search_schemes(loaded, schemes, list(batches), head)
    if runs and collective.main:
        runs.start()
        if search is not None:
            runs.save_scheme_search(search)
    collective.barrier()
    result = calibrate_model(loaded, schemes, cconfig, batches, dev, progress=progress if collective.main else None,
                             run_dir=runs, offload=offload, collective=collective,
                             held_out=_held_out_batches(loaded, calib_data, cconfig))
    if head is not None:
        with step("quantizing the output head"):
            head_device = torch.device("cpu") if offload else dev  # offloaded: the whole model fits only there
            result.quantized.append(quantize_head(loaded, schemes.for_module(head), cconfig, collective.shard(list(batches)),
                                                  head_device, collective))
    loaded.model.cpu()
    if collective.main:
        save_checkpoint(out, loaded, result.model, result.quantized, qconfig, cconfig.to_dict(), result.blocks,
                        force=True, calib_data=_data_reference(calib_data),
                        rotation=rotated, scheme_rules=schemes.to_dict()["rules"],
                        scheme_search=None if search is None else {**search, "given": given.to_dict()})
    collective.barrier()
    collective.close()
    return {"checkpoint": str(out), "blocks": result.blocks, "run_dir": str(runs.path) if runs else None,
            "method": cconfig.method, "scheme": _scheme_summary(schemes, search), "rank": collective.rank}


HELD_OUT_SEED = 7919  # held-out windows: drawn as the calibration windows are, from another seed


def _held_out_batches(loaded, calib_data, cconfig: CalibConfig) -> list:
    count = cconfig.held_out_samples
    if not count:
        return []
    return list(loaded.adapter.calibration_batches(loaded, calib_data, count, cconfig.seqlen,
                                                   cconfig.seed + HELD_OUT_SEED))


def _scheme_summary(schemes: LayerSchemes, search: dict | None = None) -> str:
    if search is not None:
        return (f"{schemes.default.name}, per-layer schemes searched for {search['effective_bits']:g} bits per weight "
                f"({search['achieved_bits']:g} reached; the table in the manifest)")
    if len(schemes.rules) > 3:
        return f"{schemes.default.name} with {len(schemes.rules)} per-layer rules"
    rules = ", ".join(f"{r.pattern} {scheme_label(r.scheme)}" for r in schemes.rules)
    return schemes.default.name + (f" ({rules})" if rules else "")


def _quantized_head(loaded, schemes: LayerSchemes, quantize_head: bool) -> str | None:
    """The head's name when it is quantized (--quantize-head, or a rule naming it), else None; every rule
    checked against the model's quantizable modules first."""
    head = loaded.adapter.head(loaded.model)
    schemes.check_matches(list(block_linears(loaded)) + ([head[0]] if head else []))
    if head is not None and schemes.names(head[0]):
        return head[0]
    if quantize_head:
        name = head_of(loaded)[0]  # one line for a model without a head
        return name if schemes.for_module(name) is not None else None  # a `none` rule keeps it float
    return None


def finished_checkpoint(out: Path, spec: str, schemes: LayerSchemes, cconfig: CalibConfig, calib_data) -> dict | None:
    """--resume of a run whose checkpoint is written, intact and made from the same model, data and
    settings: the summary of that checkpoint (nothing to recompute), else None."""
    from lrq_deploy.checkpoint import intact, read_manifest, source_reference

    try:
        manifest = read_manifest(out)
    except LrqError:
        return None
    same = (manifest.get("source") == source_reference(spec) and manifest.get("quant") == schemes.default.to_dict()
            and _given_schemes(manifest) == schemes.to_dict()
            and manifest.get("calib") == cconfig.to_dict() and manifest.get("calib_data") == _data_reference(calib_data))
    if not same or not intact(out, manifest):
        return None
    return {"checkpoint": str(out), "blocks": manifest.get("blocks", []), "run_dir": None, "method": cconfig.method,
            "scheme": _scheme_summary(schemes), "rank": 0, "already_complete": True}


def _given_schemes(manifest: dict) -> dict:
    """The per-layer rules (and budget) a checkpoint was calibrated with, before any search added rules."""
    record = manifest.get(LAYER_SCHEMES, {})
    return record.get("search", {}).get("given") or {"rules": record.get("rules", [])}


def _data_reference(calib_data) -> str | None:
    return str(Path(calib_data).resolve()) if calib_data is not None else None


def _checkpoint_bytes_at_least(spec: str, schemes: LayerSchemes) -> int | None:
    """A lower bound of the checkpoint's size: every weight element at least at the narrowest quantized width."""
    elements = weight_elements(spec)
    bits = min([schemes.default.wbits] + [r.scheme.wbits for r in schemes.rules if r.scheme is not None])
    return elements * bits // 8 if elements else None


def _collective(distributed: bool, device: torch.device):
    from lrq_deploy.calib.distributed import SINGLE, TorchDistributed

    return TorchDistributed(device) if distributed else SINGLE


def default_run_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".run")


def run_settings(spec: str, schemes: LayerSchemes, cconfig: CalibConfig, calib_data: Path | None) -> dict:
    settings = {"model": spec, "quant": schemes.default.to_dict(), "calib": cconfig.to_dict(),
                "calib_data": str(calib_data) if calib_data else None}
    if not schemes.uniform:  # recorded only when there are rules: run directories without them resume as before
        settings[LAYER_SCHEMES] = schemes.to_dict()
    return settings


def calibrate_from_options(options: dict, progress=None) -> dict:
    """`lrq calibrate`: command-line options in, checkpoint out. `options["given"]` names the
    options the user gave: with resume, the others are taken from the run directory's settings;
    a given method option the chosen method does not take is refused."""
    options = dict(options)
    given = set(options.pop("given", options))
    if options.get("revision"):
        options["model"] = with_revision(options["model"] or DEFAULT_MODEL, options["revision"])
    options.pop("revision", None)
    _apply_format(options, given)
    if options.get("resume"):
        _fill_from_run_dir(options, given)
    qconfig = layer_schemes(QuantScheme(**{name: options[name] for name in QUANT_OPTIONS}), options)
    method = get_method(options["method"])
    own = {f.name for f in fields(method.options)}
    settings = {name: options[name] for name in CALIB_OPTIONS}
    settings.update({name: options[name] for name in option_fields() if name in own or name in given})
    cconfig = CalibConfig.of(options["method"], **settings)
    epochs = getattr(cconfig.options, "epochs", 0)
    return calibrate(
        options["model"], options["out"], qconfig, cconfig, calib_data=options["calib_data"], device=options["device"],
        force=options["force"], progress=progress(epochs) if progress else None, run_dir=options["run_dir"],
        resume=options["resume"], offload=options["offload"], trust_remote_code=options["trust_remote_code"],
        distributed=options.get("distributed", False),
    )


def layer_schemes(qconfig: QuantScheme, options: dict) -> QuantScheme | LayerSchemes:
    """The command line's scheme with the rules of --scheme-for and --recipe and the budget of --effective-bits
    (or those of the resumed run)."""
    if options.get("saved_layer_schemes"):
        return LayerSchemes.from_dict(qconfig, options["saved_layer_schemes"])
    recipe = load_recipe(options["recipe"], qconfig) if options.get("recipe") else LayerSchemes(qconfig)
    given = tuple(parse_rule(text, recipe.default) for text in options.get("scheme_for") or ())
    budget = None
    if options.get("effective_bits") is not None:
        budget = BitBudget(float(options["effective_bits"]), candidate_schemes(options.get("candidates"), recipe.default))
    elif options.get("candidates"):
        raise LrqError("--candidates goes with --effective-bits (the bit-budget search)")
    schemes = LayerSchemes(recipe.default, given + recipe.rules, budget)
    return recipe.default if schemes.uniform else schemes


CALIB_OPTIONS = ("nsamples", "seqlen", "seed", "batch_size", "quantize_head", "rotate")  # every method's; its own come from the registry
QUANT_OPTIONS = tuple(f.name for f in fields(QuantScheme))


def _apply_format(options: dict, given: set) -> None:
    """--scheme PRESET fills the scheme fields not given; a float --wformat / --aformat not given its
    bits (or block) takes the format's own."""
    preset = options.pop("scheme", None)
    if preset:
        for name, value in QuantScheme.preset(preset).to_dict().items():
            if name not in given:
                options[name] = value
                given.add(name)
    for fmt_field, bits_field in (("wformat", "wbits"), ("aformat", "abits")):
        fmt = options.get(fmt_field)
        if fmt in FLOAT_FORMATS and bits_field not in given:
            options[bits_field] = FLOAT_FORMATS[fmt][0]
            given.add(bits_field)
            if fmt_field == "wformat" and "group_size" not in given:
                options["group_size"] = FLOAT_FORMATS[fmt][1]
                given.add("group_size")


def _fill_from_run_dir(options: dict, given: set) -> None:
    run_dir = Path(options["run_dir"] or default_run_dir(options["out"]))
    saved = saved_settings(run_dir)
    if saved is None:
        if not (Path(options["out"]) / MANIFEST).is_file():  # a written checkpoint is checked as a finished run
            raise LrqError(f"--resume: there is no run to resume (no run directory {run_dir}, no checkpoint at "
                           f"{options['out']}); drop --resume to start one")
        return
    calib = saved.get("calib", {})
    if not given & {"scheme_for", "recipe", "effective_bits", "candidates"}:
        options["saved_layer_schemes"] = saved.get(LAYER_SCHEMES)
    recorded = {"model": saved.get("model"), "calib_data": saved.get("calib_data"), "method": calib.get("method"),
                **{k: saved.get("quant", {}).get(k) for k in QUANT_OPTIONS},
                **{k: calib.get(k) for k in CALIB_OPTIONS},
                **(calib.get("options") or {})}
    for name, value in recorded.items():
        if name not in given and (value is not None or name in ("group_size", "seqlen", "calib_data")):
            options[name] = Path(value) if name == "calib_data" and value else value
            given.add(name)
