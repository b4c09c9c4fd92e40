import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # workers share the cores instead of oversubscribing them
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Full-precision evaluation figures are cached between runs (lrq_deploy/eval/fp_cache.py): tests
# keep theirs apart from the user's cache, one directory per test process.
os.environ["LRQ_CACHE"] = tempfile.mkdtemp(prefix="lrq-test-cache-")
atexit.register(shutil.rmtree, os.environ["LRQ_CACHE"], True)


def pytest_collection_modifyitems(config, items):
    """The longest tests first (every command of a document in one test: minutes each), so that
    `pytest -n auto` does not end on one worker still running them."""
    items.sort(key=lambda item: item.get_closest_marker("docs") is None)  # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto`: one worker per core this process may use, at most one per 3 GiB of memory
    (a worker holds models, graphs and engine builds of its own)."""
    from lrq_deploy.calib.blockwise import available_memory

    cores = len(os.sched_getaffinity(0))
    memory = available_memory()
    return max(1, min(cores, memory // (3 << 30) if memory else cores))

ASSETS = Path(__file__).resolve().parents[1] / "lrq_deploy" / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _save_hf(model, tmp: Path) -> Path:
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = ASSETS / "llama-wikitext2" / name
        if src.exists():
            shutil.copy(src, tmp / name)
    return tmp


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return _save_hf(LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=2048, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=256,
    )
    return _save_hf(OPTForCausalLM(config), tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def tiny_deit_dir(tmp_path_factory) -> Path:
    """A random distilled DeiT (class + distillation tokens, two heads) for 8x8 digits, as a
    timm directory (timm.json + model.safetensors)."""
    import json

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    spec = {"model_name": "deit_tiny_distilled_patch16_224",
            "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 2,
                       "num_heads": 2}}
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    out = tmp_path_factory.mktemp("tiny-deit")
    (out / "timm.json").write_text(json.dumps(spec))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random post-LN BERT encoder with a WordPiece vocabulary trained on the bundled text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    text = (ASSETS / "data" / "wikitext2-calib.txt").read_text().splitlines()
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A random LLaVA: 2-layer CLIP vision tower (16x16 images, 16 image tokens), projector, and
    a 2-layer Llama with grouped-query attention; processor = CLIP image processor + the bundled
    tokenizer with an <image> token."""
    from transformers import (
        AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "llama-wikitext2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """The held-out digits as PNG files in ImageFolder layout (DIR/<label>/<n>.png)."""
    from PIL import Image

    from lrq_deploy import data

    root = tmp_path_factory.mktemp("digits")
    images, labels = data.digits_split("test")
    for n, (image, label) in enumerate(zip(images[:120], labels[:120])):
        pixels = ((image[0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        (root / str(int(label))).mkdir(exist_ok=True)
        Image.fromarray(pixels, mode="L").save(root / str(int(label)) / f"{n}.png")
    return root
