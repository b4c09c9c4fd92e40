"""Calibration and evaluation data: bundled WikiText-2 text, user text files, sklearn digits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lrq_deploy.errors import LrqError

DATA_DIR = Path(__file__).resolve().parent / "assets" / "data"
BUNDLED_TEXT = {"calib": DATA_DIR / "wikitext2-calib.txt", "test": DATA_DIR / "wikitext2-test.txt"}
DIGITS_TRAIN = 1400  # the bundled ViT was trained on the first 1,400 images of a fixed permutation


def bundled_text(name: str) -> str:
    return read_text(BUNDLED_TEXT[name])


def check_regular_file(path: Path, what: str) -> None:
    """A file lrq reads whole must be a regular file: a directory, a FIFO or a device is named as
    such (a FIFO would block the read forever, a device never end)."""
    import stat

    mode = _mode(path, what)
    if stat.S_ISDIR(mode):
        raise LrqError(f"{what} {path} is a directory; give a UTF-8 text file")
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise LrqError(f"{what} {path} is a pipe or socket; give a regular UTF-8 text file")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise LrqError(f"{what} {path} is a device; give a regular UTF-8 text file")
    if not stat.S_ISREG(mode):
        raise LrqError(f"{what} {path} is not a regular file")


def _mode(path: Path, what: str) -> int:
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise LrqError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise LrqError(f"cannot read {what} {path} ({exc.strerror or exc})") from None


def check_readable_data(path: Path) -> None:
    """Calibration data given on the command line, checked before the model loads: it exists and
    is a file or a directory (text, or an image folder), not a pipe or a device."""
    import stat

    mode = _mode(path, "data file")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        check_regular_file(path, "data file")


def read_text(path: Path | str) -> str:
    path = Path(path)
    check_regular_file(path, "data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LrqError(f"data file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise LrqError(f"cannot read data file {path} ({exc.strerror or exc})") from None
    if not text.strip():
        raise LrqError(f"data file {path} is empty")
    return text


_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text`; kept for the process, so the full-precision and quantized models of
    one evaluation (same tokenizer, saved with the checkpoint) tokenize the test set once."""
    key = _tokenizer_fingerprint(tokenizer)
    if key is not None:
        key = (key, hashlib.sha1(text.encode()).hexdigest())
        if key in _TOKENIZED:
            return _TOKENIZED[key]
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if key is not None:
        _TOKENIZED.clear()  # one text at a time: the test set, then perhaps calibration text
        _TOKENIZED[key] = ids
    return ids


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of everything a fast tokenizer does (vocabulary, normalizer, special tokens) and of
    how it is called; None for other tokenizers (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    calls = (type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
    return hashlib.sha1((backend.to_str() + repr(calls)).encode()).hexdigest()


def token_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """nsamples random windows of seqlen tokens ([1, seqlen] each), reproducible from seed."""
    ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise LrqError(f"calibration text has {ids.numel()} tokens; at least {seqlen + 1} are needed for seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return [ids[s : s + seqlen].unsqueeze(0) for s in starts.tolist()]


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits as [N, 1, 8, 8] floats normalized to [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(0))
    images = torch.tensor(digits.images, dtype=torch.float32)[perm].unsqueeze(1) / 16.0
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target)[perm]
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return images[part], labels[part]


def digits_pictures(split: str) -> tuple[list, torch.Tensor]:
    """The digits split as 8-bit grayscale PIL images (for models with their own image processor)."""
    from PIL import Image

    images, labels = digits_split(split)
    pixels = ((images[:, 0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(p, mode="L") for p in pixels], labels


def folder_pictures(path: Path, limit: int | None = None, seed: int | None = None) -> list:
    """PIL images of an ImageFolder directory (at most `limit`; a seeded sample when `seed`)."""
    return [image for image, _ in _folder_items(Path(path), None, limit, seed)]


def image_folder(path: Path, size: tuple[int, int], channels: int, mean, std, limit: int | None = None,
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of an ImageFolder directory (DIR/CLASS/IMAGE; classes numbered in sorted order, as
    torchvision and ImageNet label them), resized and centre-cropped to `size`, converted to
    `channels` channels and normalized; at most `limit` of them (a seeded sample when `seed`)."""
    from torchvision import transforms

    steps = [transforms.Grayscale(1)] if channels == 1 else [transforms.Lambda(lambda image: image.convert("RGB"))]
    steps += [transforms.Resize(min(size)), transforms.CenterCrop(size), transforms.ToTensor(),
              transforms.Normalize(mean, std)]
    pairs = _folder_items(Path(path), transforms.Compose(steps), limit, seed)
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def _folder_items(path: Path, transform, limit: int | None, seed: int | None) -> list:
    from torchvision import datasets

    if not path.is_dir():
        raise LrqError(f"{path} is not an image folder (ImageFolder layout: DIR/CLASS/IMAGE)")
    try:
        folder = datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise LrqError(f"{path} is not an image folder (ImageFolder layout: DIR/CLASS/IMAGE): {exc}") from None
    order = torch.arange(len(folder)) if seed is None else torch.randperm(
        len(folder), generator=torch.Generator().manual_seed(seed))
    try:
        return [folder[i] for i in order[: limit or len(folder)].tolist()]
    except OSError as exc:
        raise LrqError(f"{path}: an image cannot be read ({exc})") from None
