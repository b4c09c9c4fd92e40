import hashlib
import json
import math

import pytest
import torch

from lrq_deploy.calib import learnable
from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.blockwise import BlockJob, block_errors, run_block
from lrq_deploy.calib.losses import DynamicWeighting, mse, nlc
from lrq_deploy.calib.registry import CalibConfig, get_method
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.data import token_windows
from lrq_deploy.models import load_model

from devices import DEVICES


def test_log_equivalent_init_hand_computed():
    a = torch.tensor([0.0, 2.0, 14.0])
    # a / log2(2 + a): 0 / 1, 2 / 2, 14 / 4
    assert learnable.log_equivalent_scale(a).tolist() == [0.0, 1.0, 3.5]


def test_lwc_init_and_bounds():
    assert learnable.lwc_factor(torch.tensor(learnable.LWC_INIT)).item() == pytest.approx(1 / (1 + math.exp(-4)))
    factors = learnable.lwc_factor(torch.tensor([-50.0, 0.0, 50.0]))
    assert factors.min() >= 0 and factors.max() <= 1 and factors[1] == 0.5


def test_nlc_hand_computed():
    out = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # token cosines 1 and 1/sqrt(2): mean(-log) = log(2) / 4
    assert nlc(out, target).item() == pytest.approx(math.log(2) / 4, rel=1e-6)


def test_dynamic_weighting_update():
    weighting = DynamicWeighting(("mse", "nlc"), momentum=0.95)
    first = weighting({"mse": torch.tensor(2.0), "nlc": torch.tensor(0.5)})
    assert first.item() == pytest.approx(2.0)  # each term divided by itself
    second = weighting({"mse": torch.tensor(4.0), "nlc": torch.tensor(0.5)})
    assert weighting.means["mse"] == pytest.approx(0.95 * 2.0 + 0.05 * 4.0)
    assert second.item() == pytest.approx(4.0 / 2.1 + 1.0)


def _job(loaded, qconfig, cconfig, n=4, seqlen=32):
    adapter, model = loaded.adapter, loaded.model
    batches = token_windows(loaded.tokenizer, "lorem ipsum dolor sit amet, consectetur " * 300, n, seqlen, 0)
    inputs = adapter.capture_block_inputs(model, batches)
    block = adapter.blocks(model)[0]
    targets = run_block(adapter, block, inputs.hidden, inputs.kwargs, 2)
    return BlockJob(
        0, block, adapter, adapter.smooth_groups(model), adapter.linear_names(block), qconfig, cconfig,
        inputs.hidden, inputs.hidden, targets, inputs.kwargs, torch.device("cpu"),
    )


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("method", ["lrquant", "lrquant+"])
@pytest.mark.parametrize("act_asym", [False, True], ids=["sym", "asym"])
def test_training_lowers_loss_and_fold_matches_fake_quant(fixture, method, act_asym, request):
    """What is trained is what is deployed: the folded QuantLinear block reproduces the
    fake-quant block the parameters were learned on, with either activation mapping."""
    loaded = load_model(str(request.getfixturevalue(fixture)))
    recipe = get_method(method).quantize_block.recipe
    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=act_asym)
    job = _job(loaded, qconfig, CalibConfig.of(method=method, nsamples=4, seqlen=32, epochs=3, batch_size=2, lr_smooth=1e-2))
    params = learnable.init_block_params(job, recipe)
    with torch.no_grad():  # start clipping from the fixed value, so that training has work to do
        for p in params.of_kind("lwc_up", "lwc_low"):
            p.fill_(learnable.LWC_INIT)
    targets = [job.fp_targets] + ([job.run(job.q_inputs)] if recipe.two_branch else [])

    def fake_quant_loss():
        with torch.no_grad(), learnable.activation_fake_quant(job):
            block = learnable._WithParams(job.block, learnable.fake_quant_block_params(job, params))
            out = job.adapter.run_block(block, job.q_inputs, job.kwargs)
        # fixed weights (no running means) so that before and after are comparable
        return sum((mse(out, t) + nlc(out, t)).item() for t in targets), out

    before, _ = fake_quant_loss()
    for p in job.block.parameters():
        p.requires_grad_(False)
    learnable.train_block(job, params, recipe)
    after, expected = fake_quant_loss()
    assert after < before
    learnable.fold_and_quantize(job, params)
    with torch.no_grad():
        folded = job.adapter.run_block(job.block, job.q_inputs, job.kwargs)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,wbits,group", [("lrquant", 3, 32), ("lrquant+", 2, 16)])
def test_gptq_rounding_keeps_the_best_of_its_parts(tiny_llama_dir, method, wbits, group):
    """--rounding gptq: per block, the lowest block-output error of learned transforms + GPTQ, GPTQ
    alone and learned transforms + nearest; the choice and the three errors are recorded, and the
    block as quantized shows the chosen one's error."""
    loaded = load_model(str(tiny_llama_dir))
    recipe = get_method(method).quantize_block.recipe
    qconfig = QuantScheme(wbits=wbits, group_size=group)
    job = _job(loaded, qconfig, CalibConfig.of(method=method, nsamples=4, seqlen=32, epochs=2, rounding="gptq"))
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = learnable.init_block_params(job, recipe)
    learnable.train_block(job, params, recipe)
    choice = learnable.fold_and_quantize(job, params)
    errors = choice["rounding_mse"]
    assert set(errors) == set(learnable.ROUNDINGS) and choice["rounding"] == min(errors, key=errors.get)
    with torch.no_grad():
        quantized = block_errors(job.fp_targets, job.run(job.q_inputs))["mse"]
    assert quantized == pytest.approx(errors[choice["rounding"]], rel=1e-6)
    assert len({round(e, 12) for e in errors.values()}) == 3  # three different roundings were measured


def test_gptq_rounding_is_judged_on_held_out_windows(tiny_llama_dir):
    """With held-out windows on the job the three roundings are compared there, not on the windows
    the learned candidates were fitted to; the block as quantized shows the recorded error there."""
    from lrq_deploy.calib.blockwise import HeldOut

    loaded = load_model(str(tiny_llama_dir))
    recipe = get_method("lrquant").quantize_block.recipe
    cconfig = CalibConfig.of(method="lrquant", nsamples=4, seqlen=32, epochs=2, rounding="gptq")
    job = _job(loaded, QuantScheme(wbits=3, group_size=32), cconfig)
    other = _job(loaded, QuantScheme(wbits=3), cconfig, n=3)  # other text positions: seed 0 of a shorter draw
    held_in = other.q_inputs.flip(1).contiguous()  # windows the block never trained on
    job.held_out = HeldOut(held_in, job.run(held_in))
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = learnable.init_block_params(job, recipe)
    learnable.train_block(job, params, recipe)
    choice = learnable.fold_and_quantize(job, params)
    assert choice["rounding_judged_on"] == "held-out"
    errors = choice["rounding_mse"]
    assert choice["rounding"] == min(errors, key=errors.get)
    with torch.no_grad():
        on_held_out = block_errors(job.held_out.fp_targets, job.run(held_in))["mse"]
        on_training = block_errors(job.fp_targets, job.run(job.q_inputs))["mse"]
    assert on_held_out == pytest.approx(errors[choice["rounding"]], rel=1e-6)
    assert on_training != pytest.approx(on_held_out, rel=1e-3)


def test_calibrate_draws_held_out_windows_for_the_rounding_choice(tmp_path, tiny_llama_dir):
    """lrquant --rounding gptq --holdout 2: the checkpoint's blocks record choices judged on held-out
    windows (drawn besides --nsamples from another seed); the errors recorded for each block are
    what the finished checkpoint gives on those windows, block by block."""
    from lrq_deploy.calib.api import HELD_OUT_SEED
    from lrq_deploy.checkpoint import load_checkpoint

    cconfig = CalibConfig.of(method="lrquant", nsamples=4, seqlen=32, epochs=1, rounding="gptq", holdout=2)
    out = tmp_path / "q"
    result = calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=3, group_size=32), cconfig, device="cpu")
    fp, q = load_model(str(tiny_llama_dir)), load_checkpoint(out).loaded
    held = fp.adapter.calibration_batches(fp, None, 2, 32, cconfig.seed + HELD_OUT_SEED)
    fp_in = fp.adapter.capture_block_inputs(fp.model, held)
    q_in = q.adapter.capture_block_inputs(q.model, held)
    fp_hidden, q_hidden = fp_in.hidden, q_in.hidden
    with torch.no_grad():
        for index, (record, fp_block, q_block) in enumerate(zip(result["blocks"], fp.adapter.blocks(fp.model),
                                                                q.adapter.blocks(q.model))):
            assert record["rounding_judged_on"] == "held-out"
            fp_hidden = run_block(fp.adapter, fp_block, fp_hidden, fp_in.kwargs_for(index), 2)
            q_hidden = run_block(q.adapter, q_block, q_hidden, q_in.kwargs_for(index), 2)
            assert block_errors(fp_hidden, q_hidden)["mse"] == pytest.approx(
                record["rounding_mse"][record["rounding"]], rel=1e-4)
    off = CalibConfig.of(method="lrquant", nsamples=4, seqlen=32, epochs=1, rounding="gptq", holdout=0)
    again = calibrate(str(tiny_llama_dir), tmp_path / "q0", QuantScheme(wbits=3, group_size=32), off, device="cpu")
    assert {b["rounding_judged_on"] for b in again["blocks"]} == {"calibration"}


def _sha(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


class _KillAfterFirstBlock:
    def epoch(self, epoch, loss):
        pass

    def block_done(self, report, total):
        raise KeyboardInterrupt  # the process dies right after block 0's parameters were saved


def test_resume_after_kill_gives_identical_checkpoint(tmp_path, tiny_llama_dir):
    qconfig = QuantScheme(wbits=4, abits=8, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2)
    calibrate(str(tiny_llama_dir), tmp_path / "full", qconfig, cconfig, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        calibrate(str(tiny_llama_dir), tmp_path / "resumed", qconfig, cconfig, device="cpu", progress=_KillAfterFirstBlock())
    assert not (tmp_path / "resumed").exists()
    run_dir = tmp_path / "resumed.run"
    assert (run_dir / "block_000.safetensors").is_file() and not (run_dir / "block_001.safetensors").exists()
    block0_curve = json.loads((run_dir / "report.json").read_text())["loss_curves"]["0"]
    calibrate(str(tiny_llama_dir), tmp_path / "resumed", qconfig, cconfig, device="cpu", resume=True)
    assert _sha(tmp_path / "resumed") == _sha(tmp_path / "full")
    curves = json.loads((run_dir / "report.json").read_text())["loss_curves"]
    assert set(curves) == {"0", "1"} and all(len(c) == cconfig.options.epochs for c in curves.values())
    assert curves["0"] == block0_curve  # the saved block was not trained again
    assert curves == json.loads((tmp_path / "full.run" / "report.json").read_text())["loss_curves"]
    _assert_plot_has_one_line_per_block(run_dir / "losses.png", blocks=2)


def _assert_plot_has_one_line_per_block(path, blocks):
    """losses.png decodes at the figure size and holds each block's line colour (matplotlib's cycle)."""
    import matplotlib.image
    import numpy as np
    from matplotlib import colors

    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (400, 600)
    pixels = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for index in range(blocks):
        rgb = np.array([round(c * 255) for c in colors.to_rgb(f"C{index}")])
        assert (np.abs(pixels - rgb).sum(axis=1) <= 6).sum() > 50, f"no line for block {index}"
    rgb = np.array([round(c * 255) for c in colors.to_rgb(f"C{blocks}")])
    assert (np.abs(pixels - rgb).sum(axis=1) <= 6).sum() == 0  # and no more lines


@pytest.mark.parametrize("device", DEVICES)
def test_offload_gives_the_same_checkpoint(tmp_path, tiny_llama_dir, device):
    """--offload keeps the model in CPU memory and moves one block at a time to the device: the
    arithmetic is the resident run's, so the checkpoint is too (on CUDA: block-0 inputs are
    captured on the device in both cases)."""
    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2)
    calibrate(str(tiny_llama_dir), tmp_path / "a", qconfig, cconfig, device=device)
    calibrate(str(tiny_llama_dir), tmp_path / "b", qconfig, cconfig, device=device, offload=True)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_gives_identical_checkpoints(tmp_path, tiny_llama_dir, device):
    """Same settings and seed, same bytes (on CUDA through the deterministic algorithms calibrate sets)."""
    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2, seed=5)
    for name in ("a", "b"):
        calibrate(str(tiny_llama_dir), tmp_path / name, qconfig, cconfig, device=device)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")


def test_offload_captures_block_inputs_on_the_calibration_device(tiny_llama_dir, monkeypatch):
    """With offload the model lives on the CPU, yet block-0 inputs (embeddings, rotary cos/sin)
    are computed on the calibration device, as in a resident run: CPU and CUDA cos/sin differ
    in the last bits, which made offloaded CUDA checkpoints differ from resident ones. Checked
    with the meta device standing in for a GPU: during capture everything outside the blocks
    is there, the blocks stay put, and afterwards everything is back."""
    from lrq_deploy.calib.blockwise import outside_blocks_on

    loaded = load_model(str(tiny_llama_dir))
    model, blocks = loaded.model, loaded.adapter.blocks(loaded.model)
    embed = model.get_input_embeddings().weight
    with outside_blocks_on(model, blocks, torch.device("meta")):
        assert model.get_input_embeddings().weight.is_meta
        assert all(b.device.type == "meta" for b in model.buffers() if not any(b is x for blk in blocks for x in blk.buffers()))
        assert all(not p.is_meta for blk in blocks for p in blk.parameters())
    assert model.get_input_embeddings().weight is embed and not any(p.is_meta for p in model.parameters())


def test_nan_loss_stops_with_block_name(tiny_llama_dir, monkeypatch):
    from lrq_deploy.errors import LrqError

    loaded = load_model(str(tiny_llama_dir))
    job = _job(loaded, QuantScheme(wbits=4, abits=4, act_asym=False), CalibConfig.of(method="lrquant", nsamples=2, seqlen=16, epochs=1))
    params = learnable.init_block_params(job, get_method("lrquant").quantize_block.recipe)
    monkeypatch.setattr(learnable, "nlc", lambda out, target: torch.tensor(float("nan"), requires_grad=True))
    for p in job.block.parameters():
        p.requires_grad_(False)
    with pytest.raises(LrqError, match="block 0, epoch 0: the loss became NaN"):
        learnable.train_block(job, params, get_method("lrquant").quantize_block.recipe)


def test_compiled_step_matches_eager_step(tiny_llama_dir):
    """torch.compile of the training step (--compile) computes the same losses and gradients as the
    eager step: the float16 rounding of the scales survives fusion (emulate_precision_casts), so the
    activation and weight codes are the same and only float summation order differs."""
    import dataclasses

    loaded = load_model(str(tiny_llama_dir))
    recipe = get_method("lrquant+").quantize_block.recipe
    cconfig = CalibConfig.of(method="lrquant+", nsamples=2, seqlen=32, epochs=1)
    job = _job(loaded, QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False), cconfig, n=2)
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = learnable.init_block_params(job, recipe)
    objective = learnable.Objective(recipe)
    targets = [job.fp_targets, job.run(job.q_inputs)]
    compiled = dataclasses.replace(cconfig, options=dataclasses.replace(cconfig.options, compile=True))
    compiled_job = dataclasses.replace(job, cconfig=compiled)
    results = []
    for step_job in (job, compiled_job):
        params.zero_grad(set_to_none=True)
        terms = learnable.loss_terms_fn(step_job, params, objective)(job.q_inputs, targets)
        sum(v for branch in terms for v in branch.values()).backward()
        results.append(([v.item() for branch in terms for v in branch.values()],
                        {n: p.grad.clone() for n, p in params.values.items()}))
    (eager_terms, eager_grads), (compiled_terms, compiled_grads) = results
    assert compiled_terms == pytest.approx(eager_terms, rel=1e-4)
    for name, grad in eager_grads.items():  # per tensor: single elements that sum many small terms vary more
        assert (compiled_grads[name] - grad).norm() <= 1e-3 * grad.norm(), name


def test_compiled_calibration_within_tolerance_of_eager(tmp_path, tiny_llama_dir):
    """lrq calibrate --compile: the checkpoint evaluates like the eager one (steps differ only in summation
    order, which can move a few rounding decisions as training proceeds)."""
    from lrq_deploy.checkpoint import load_checkpoint

    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    for name, compile in (("eager", False), ("compiled", True)):
        cconfig = CalibConfig.of(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2, compile=compile)
        calibrate(str(tiny_llama_dir), tmp_path / name, qconfig, cconfig, device="cpu")
    settings = __import__("json").loads((tmp_path / "compiled.run" / "run.json").read_text())
    assert settings["calib"]["options"]["compile"] is True
    eager, compiled = (load_checkpoint(tmp_path / n).model for n in ("eager", "compiled"))
    fp = load_model(str(tiny_llama_dir)).model
    ids = torch.randint(0, fp.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: m(ids).logits.flatten() for name, m in (("fp", fp), ("eager", eager), ("compiled", compiled))}
    fidelity = {n: torch.nn.functional.cosine_similarity(logits[n], logits["fp"], dim=0).item() for n in ("eager", "compiled")}
    # the two runs' distance from each other is below the quantization error, and both keep the same fidelity
    assert 1 - torch.nn.functional.cosine_similarity(logits["eager"], logits["compiled"], dim=0) < 1 - fidelity["eager"]
    assert fidelity["compiled"] == pytest.approx(fidelity["eager"], abs=2e-3)


def test_training_keeps_the_best_epoch(tiny_llama_dir):
    """Every epoch is judged by the fake-quant block output's MSE to the FP output; the parameters
    kept are those of the best epoch (0: the initialisation), so a block never ends worse than
    it started, even when training drifts (here: a learning rate far too high)."""
    loaded = load_model(str(tiny_llama_dir))
    recipe = get_method("lrquant+").quantize_block.recipe
    cconfig = CalibConfig.of(method="lrquant+", nsamples=4, seqlen=32, epochs=3, batch_size=2, lr_smooth=0.1, lr_lwc=0.1)
    job = _job(loaded, QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False), cconfig)
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = learnable.init_block_params(job, recipe)
    initial = learnable.fake_quant_errors(job, params)
    record = learnable.train_block(job, params, recipe)
    mse = record["mse_per_epoch"]
    assert len(mse) == cconfig.options.epochs + 1 and mse[0] == pytest.approx(initial["mse"])
    assert record["best_epoch"] == min(range(len(mse)), key=mse.__getitem__)
    assert max(mse[1:]) > mse[0]  # this training made the block worse at some epoch...
    kept = learnable.fake_quant_errors(job, params)
    assert kept["mse"] == pytest.approx(mse[record["best_epoch"]], rel=1e-6) and kept["mse"] <= initial["mse"]


def test_run_report_records_training_per_block(tmp_path, tiny_llama_dir):
    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant", nsamples=4, seqlen=32, epochs=2, batch_size=2)
    result = calibrate(str(tiny_llama_dir), tmp_path / "q", qconfig, cconfig, device="cpu")
    training = json.loads((tmp_path / "q.run" / "report.json").read_text())["training"]
    assert set(training) == {"0", "1"}
    for index, record in training.items():
        assert len(record["mse_per_epoch"]) == len(record["cosine_per_epoch"]) == cconfig.options.epochs + 1
        best = record["best_epoch"]
        assert record["mse_per_epoch"][best] == min(record["mse_per_epoch"])
        assert result["blocks"][int(index)]["best_epoch"] == best


@pytest.mark.parametrize("qconfig", [QuantScheme(wbits=3), QuantScheme(wbits=4, abits=4, group_size=32)],
                         ids=lambda q: q.name)
def test_searched_init_starts_no_worse_than_the_fixed_init(tiny_llama_dir, qconfig):
    """The searched start (AWQ scales for weight-only schemes, searched clipping) has a lower
    fake-quant block error than the fixed start (LWC logits 4, statistics-based scales)."""
    loaded = load_model(str(tiny_llama_dir))
    job = _job(loaded, qconfig, CalibConfig.of(method="lrquant", nsamples=4, seqlen=32))
    recipe = get_method("lrquant").quantize_block.recipe
    searched = learnable.init_block_params(job, recipe)
    fixed = learnable.init_block_params(job, recipe)
    with torch.no_grad():
        for p in fixed.of_kind("lwc_up", "lwc_low"):
            p.fill_(learnable.LWC_INIT)
        if not qconfig.quantize_activations:
            stats = learnable.input_stats(job, [g.linears[0] for g in job.groups], job.q_inputs)
            for i, group in enumerate(job.groups):
                first = stats[group.linears[0]]
                absmax = learnable.reduce_to_prev(torch.maximum(first["max"], -first["min"]), group).clamp(min=1e-5)
                fixed.get("scale", f"group{i}").copy_(learnable.log_equivalent_scale(absmax))
    assert learnable.fake_quant_errors(job, searched)["mse"] < learnable.fake_quant_errors(job, fixed)["mse"]
