"""Real data available offline for the benchmarks: Fashion-MNIST images and the King James Bible as characters.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any directory
holding the four IDX files of the original release, gzipped or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]  t10k-images-idx3-ubyte[.gz]  t10k-labels-idx1-ubyte[.gz]

The Bible text comes from Debian's ``bible-kjv`` (the ``bible`` program) or from a plain-text file, one verse per
line, optionally starting with a reference such as ``Ge1:1`` or ``Gen 1:1`` (stripped).

Every split used for a choice (learning rate, schedule) is a validation split carved from the training data; the
test split is only read for the final numbers.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
KJV_FILE = "kjv.txt"  # looked for in --data-dir before falling back to the `bible` program
KJV_RANGE = "gen1:1-rev22:21"
# `bible` prints "Ge1:1 In the beginning...", "1Cor13:4 ...", "SSol1:1 ..."; other editions write "Gen 1:1".
VERSE_REFERENCE = re.compile(r"^[1-3]?\s?[A-Za-z]+\.?\s?\d+:\d+\s*", re.MULTILINE)


@dataclass(frozen=True)
class ImageSplits:
    """Normalised images ``(n, 1, 28, 28)`` float32 and int64 labels for train, validation and test."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TextSplits:
    """Character ids (int64, 1-D) for train, validation and test, and the vocabulary they index."""

    train: Tensor
    val: Tensor
    test: Tensor
    vocab: list[str]


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format: magic, dims, then big-endian uint8 data), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes of data (truncated?)")
    return data.reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{s}[.gz]" for s in FASHION_MNIST_FILES.values())
    raise FileNotFoundError(
        f"Fashion-MNIST: no {stem}.gz or {stem} in {data_dir}. Expected the four IDX files of the original release "
        f"there ({expected}); on Debian/Ubuntu `apt install dataset-fashion-mnist` puts them in {FASHION_MNIST_DIR}, "
        "or pass --data-dir pointing at your copy."
    )


def fashion_mnist(data_dir: str | Path | None = None, val_size: int = 5000, seed: int = 0) -> ImageSplits:
    """Load Fashion-MNIST, normalised with the training set's mean and std; ``val_size`` training images are held out.

    Args:
        data_dir: directory holding the four IDX files (default: Debian's ``/usr/share/datasets/fashion-mnist``).
        val_size: images carved at random (fixed ``seed``) from the 60,000 training images for validation.
        seed: seed of that split, independent of the training seed so every run sees the same validation set.
    """
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    train_x = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    test_x = torch.from_numpy(arrays["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    mean, std = train_x[train_idx].mean(), train_x[train_idx].std()
    return ImageSplits(
        train=((train_x[train_idx] - mean) / std, train_y[train_idx]),
        val=((train_x[val_idx] - mean) / std, train_y[val_idx]),
        test=((test_x - mean) / std, test_y),
    )


def strip_references(text: str) -> str:
    """Drop the verse reference at the start of every line: ``"Ge1:1 In the beginning"`` -> ``"In the beginning"``.

    Example:
        >>> strip_references("Ge1:1 In the beginning\\n1Cor13:4 Charity suffereth long\\nGen 1:2 And the earth")
        'In the beginning\\nCharity suffereth long\\nAnd the earth'
    """
    return VERSE_REFERENCE.sub("", text)


def kjv_text(path: str | Path | None = None) -> str:
    """The King James Bible as one string, verse references stripped, one verse per line.

    Args:
        path: a plain-text file; ``None`` runs ``bible -f gen1:1-rev22:21`` (Debian's ``bible-kjv``).
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KJV text: {path} is not a file; pass a plain-text Bible, one verse per line")
        return strip_references(path.read_text(encoding="utf-8"))
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            "KJV text: the `bible` program is not installed and no text file was given. Install Debian's bible-kjv "
            f"(`apt install bible-kjv`) or put the text in <data-dir>/{KJV_FILE} and pass --data-dir."
        )
    # with stdin a terminal `bible` starts its interactive prompt; with stdin closed it prints and exits
    result = subprocess.run(
        ["bible", "-f", KJV_RANGE], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    )
    return strip_references(result.stdout)


def char_splits(text: str, chunk: int = 10_000, period: int = 20) -> TextSplits:
    """Encode characters and split the text into interleaved chunks: 1 in ``period`` test, 1 in ``period`` validation.

    Interleaving keeps the three splits from the same books (the Old and New Testaments differ in style), and
    chunks of ``chunk`` characters keep each split made of long contiguous passages.
    """
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    pieces: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for i, start in enumerate(range(0, len(ids), chunk)):
        split = "test" if i % period == 0 else "val" if i % period == period // 2 else "train"
        pieces[split].append(ids[start : start + chunk])
    return TextSplits(*(torch.cat(pieces[s]) for s in ("train", "val", "test")), vocab=vocab)


def kjv(data_dir: str | Path | None = None) -> TextSplits:
    """The KJV as character splits; reads ``<data_dir>/kjv.txt`` when a directory is given, else runs ``bible``."""
    if data_dir is None:
        return char_splits(kjv_text(None))
    path = Path(data_dir) / KJV_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"KJV text: --data-dir {data_dir} has no {KJV_FILE}. Put the Bible there as plain text (one verse per "
            "line, references optional), or leave --data-dir out to use Debian's `bible` program."
        )
    return char_splits(kjv_text(path))
