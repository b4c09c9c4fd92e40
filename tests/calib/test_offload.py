"""--offload reads an HF model block by block from its safetensors shards."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.models import load_model


def test_offload_materialises_one_block_at_a_time(tmp_path, tiny_llama_dir, monkeypatch):
    """While block i is quantized, blocks after it hold no weights (meta) yet."""
    from dataclasses import replace

    from lrq_deploy.calib import api, registry

    seen, loaded = [], {}

    def load(*args, **kwargs):
        loaded["model"] = load_model(*args, **kwargs)
        return loaded["model"]

    rtn = registry.get_method("rtn").quantize_block

    def watching(job):
        blocks = loaded["model"].adapter.blocks(loaded["model"].model)
        seen.append([any(p.is_meta for p in b.parameters()) for b in blocks])
        return rtn(job)

    monkeypatch.setattr(api, "load_model", load)
    monkeypatch.setitem(registry._REGISTRY, "rtn", replace(registry.get_method("rtn"), quantize_block=watching))
    calibrate(str(tiny_llama_dir), tmp_path / "q", QuantScheme(wbits=4, group_size=32), CalibConfig.of(nsamples=2, seqlen=32),
              device="cpu", offload=True)
    assert seen == [[False, True], [False, False]]  # block 1 was read only when its turn came


def test_lazy_model_keeps_blocks_on_meta_and_reads_them_from_shards(tmp_path, tiny_llama_dir):
    """Sharded checkpoints (model.safetensors.index.json) are read by parameter name; a block once
    materialised equals the eagerly loaded model's."""
    import shutil

    from safetensors.torch import load_file

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for index, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    lazy = load_model(str(sharded), lazy=True)
    eager = load_model(str(tiny_llama_dir))
    blocks = lazy.adapter.blocks(lazy.model)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    assert not any(p.is_meta for n, p in lazy.model.named_parameters() if not n.startswith("model.layers."))
    lazy.materialize(blocks[1])
    for (name, a), (_, b) in zip(blocks[1].named_parameters(), lazy.adapter.blocks(eager.model)[1].named_parameters()):
        assert torch.equal(a, b), name
    assert all(p.is_meta for p in blocks[0].parameters())


def test_lazy_model_with_poisoned_block_weights_is_refused_when_read(tmp_path, tiny_llama_dir):
    import shutil

    from safetensors.torch import load_file

    from lrq_deploy.errors import LrqError

    poisoned = tmp_path / "nan"
    shutil.copytree(tiny_llama_dir, poisoned)
    tensors = load_file(str(poisoned / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(poisoned / "model.safetensors"))
    with pytest.raises(LrqError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        calibrate(str(poisoned), tmp_path / "q", QuantScheme(wbits=4, group_size=32), CalibConfig.of(nsamples=2, seqlen=32),
                  device="cpu", offload=True)


def test_offload_disk_gives_the_same_checkpoint(tmp_path, tiny_llama_dir):
    """--offload disk keeps block activations in mapped files; the arithmetic is unchanged."""
    import hashlib

    from click.testing import CliRunner

    from lrq_deploy.cli import main

    args = ["--method", "lrquant", "--wbits", "4", "--abits", "8", "--group-size", "32", "--nsamples", "4",
            "--seq-len", "32", "--epochs", "1", "--batch-size", "2"]
    for name, extra in (("memory", ["--offload"]), ("disk", ["--offload", "disk"])):
        result = CliRunner().invoke(main, ["calibrate", str(tiny_llama_dir), "-o", str(tmp_path / name), *args, *extra])
        assert result.exit_code == 0, result.output
    digest = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in ("memory", "disk")]
    assert digest[0] == digest[1]


def test_activation_store_on_disk_is_file_backed(tmp_path, monkeypatch):
    from lrq_deploy.calib import blockwise

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with blockwise._activation_store("disk") as keep:
        source = torch.randn(3, 5, 7)
        kept = keep(source)
        assert torch.equal(kept, source) and kept.data_ptr() != source.data_ptr()
        spill = next(tmp_path.glob("lrq-activations-*"))
        assert list(spill.iterdir()) == []  # unlinked at once: the mapping alone holds the data
    assert not any(tmp_path.glob("lrq-activations-*"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_rounding_methods_offloaded_give_the_same_checkpoint(tmp_path, tiny_llama_dir, method):
    """GPTQ / AWQ with --offload (one block at a time on the device, the rest in CPU memory)."""
    import hashlib

    qconfig, cconfig = QuantScheme(wbits=3, group_size=32), CalibConfig.of(method, nsamples=4, seqlen=32)
    calibrate(str(tiny_llama_dir), tmp_path / "plain", qconfig, cconfig, device="cpu")
    calibrate(str(tiny_llama_dir), tmp_path / "offload", qconfig, cconfig, device="cpu", offload=True)
    digest = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest()
              for n in ("plain", "offload")]
    assert digest[0] == digest[1]
