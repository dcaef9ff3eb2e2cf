"""The datasets a run can train on, by the name ``--dataset`` gives (``config.DATASETS``).

Every loader returns (uint8 images [N,H,W] or [N,C,H,W], int64 labels [N]), decoded once
so a batch is a tensor slice. The IDX sets (MNIST and the sets torchvision stores the same
way) share ``data.parse_idx``; ``folder`` reads a user's class-folder tree of images as
torchvision's ``ImageFolder`` does, made 1-channel 28x28 (as predict.py makes a user's
images); ``cifar10`` reads torchvision's python batches. Which model can train on which
images is ``models.check_trainable``'s to say.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fl.learning.config import DATASETS, Split
from fl.learning.data import DATA_DIR_ENV, DataError, load_mnist, read_idx_file

DIGITS = (1, 28, 28)  # the IDX sets' images, and a folder's as they are read
MAX_FOLDER_CLASSES = 1000  # ImageNet's: a folder tree with more is most likely the wrong folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
HOLDOUT_SEED = 0  # not --seed: a client's own --seed must never move test images into its training set
_DOWNLOAD_TIMEOUT_S = 15.0
_EMNIST_CLASSES = {"digits": 10, "mnist": 10, "letters": 27, "balanced": 47, "bymerge": 47, "byclass": 62}


@dataclass(frozen=True)
class Spec:
    """What a run needs to know of a dataset before reading it."""

    shape: tuple[int, int, int]  # C, H, W
    classes: int | None  # None: the folder's subfolders
    torchvision: str | None  # the class that downloads it
    raw: str  # torchvision's folder under --data-dir


def spec(name: str) -> Spec:
    """ValueError (one line) for a name that is not one of ``DATASETS``."""
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r} (expected one of {', '.join(DATASETS)})")
    if name.startswith("emnist-"):
        return Spec(DIGITS, _EMNIST_CLASSES[name[7:]], "EMNIST", "EMNIST/raw")
    return {"mnist": Spec(DIGITS, 10, "MNIST", "MNIST/raw"),
            "fashion-mnist": Spec(DIGITS, 10, "FashionMNIST", "FashionMNIST/raw"),
            "kmnist": Spec(DIGITS, 10, "KMNIST", "KMNIST/raw"),
            "cifar10": Spec((3, 32, 32), 10, "CIFAR10", "cifar-10-batches-py"),
            "folder": Spec(DIGITS, None, None, "")}[name]


def load_dataset(name: str, data_dir: str | Path, train: bool, download: bool = True,
                 test_fraction: float = Split.test_fraction) -> tuple[torch.Tensor, torch.Tensor]:
    """The train or test part of dataset ``name``; DataError (one line) when unusable."""
    data_dir = Path(data_dir)
    spec(name)  # ValueError for an unknown name
    if name == "mnist":
        return load_mnist(data_dir, train, download)
    if name == "folder":
        return load_folder(data_dir, train, test_fraction)
    if name == "cifar10":
        return _with_download(load_cifar10, data_dir, train, download, name)
    return _with_download(lambda d, t: load_idx_set(name, d, t), data_dir, train, download, name)


def _with_download(load, data_dir: Path, train: bool, download: bool, name: str):
    try:
        return load(data_dir, train)
    except FileNotFoundError as missing:
        if download and _try_download(name, data_dir, train):
            return load(data_dir, train)
        why = "and download failed" if download else "download disabled"
        raise DataError(f"{name} not found in {data_dir} ({why}): {missing}, "
                        f"or pass --data-dir / set {DATA_DIR_ENV}") from None


def _try_download(name: str, data_dir: Path, train: bool) -> bool:
    """Best effort only: offline machines must fail fast, not hang on a socket."""
    s, old_timeout = spec(name), socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        from torchvision import datasets

        kwargs = {"split": name[7:]} if name.startswith("emnist-") else {}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            getattr(datasets, s.torchvision)(root=str(data_dir), train=train, download=True, **kwargs)
        return True
    except Exception:  # noqa: BLE001 - any failure just means "still missing"
        return False
    finally:
        socket.setdefaulttimeout(old_timeout)


def idx_stems(name: str, train: bool) -> tuple[str, str]:
    """The file names (without .gz) torchvision and the sets' own archives use."""
    part = "train" if train else "t10k"
    if name.startswith("emnist-"):
        part = f"{name}-{'train' if train else 'test'}"
    return f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte"


def load_idx_set(name: str, data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An IDX set in ``data_dir`` itself, torchvision's ``<Set>/raw`` or EMNIST's ``gzip/``;
    FileNotFoundError naming the files to put there."""
    folders = (data_dir, data_dir / spec(name).raw, data_dir / "gzip")
    stems = idx_stems(name, train)
    found = [next((f / n for f in folders for n in (stem, f"{stem}.gz") if (f / n).is_file()), None) for stem in stems]
    if None in found:
        raise FileNotFoundError("put " + ", ".join(f"{stem}.gz" for stem in stems) + " there")
    images, labels = (read_idx_file(p) for p in found)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(f"{found[0]}: expected [N,28,28] images and N labels, got {list(images.shape)} "
                        f"and {list(labels.shape)}")
    if name.startswith("emnist-"):
        images = images.transpose(1, 2).contiguous()  # EMNIST's files hold the images transposed
    return images, _checked_labels(labels.long(), spec(name).classes, found[1])


def _checked_labels(labels: torch.Tensor, classes: int, where: object) -> torch.Tensor:
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < classes):
        raise DataError(f"{where}: labels {int(labels.min())}..{int(labels.max())} are outside 0..{classes - 1}")
    return labels


def folder_classes(root: Path) -> list[str]:
    """The class names, as ImageFolder orders them: the sorted subfolder names."""
    top = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    if not top.is_dir():
        raise DataError(f"--dataset folder: {root} is not a folder (give --data-dir a folder with one "
                        "subfolder of images per class, or train/ and test/ folders holding those)")
    classes = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not 2 <= len(classes) <= MAX_FOLDER_CLASSES:
        raise DataError(f"--dataset folder: {top} has {len(classes)} class subfolders; a run needs "
                        f"2..{MAX_FOLDER_CLASSES} (one subfolder of images per class)")
    return classes


def folder_files(root: Path, train: bool, test_fraction: float) -> list[tuple[Path, int]]:
    """(image, class) pairs of the train or test part: ``train/`` and ``test/`` when both
    exist, else a held-out ``test_fraction`` drawn with a fixed seed from the file names."""
    classes = folder_classes(root)
    split = (root / "train").is_dir() and (root / "test").is_dir()
    top = root / ("train" if train else "test") if split else root
    files = [(p, c) for c, name in enumerate(classes) if (top / name).is_dir()
             for p in sorted((top / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not split:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
        held = set(order[:round(len(files) * test_fraction)])
        files = [f for i, f in enumerate(files) if (i in held) != train]
    if not files:
        raise DataError(f"--dataset folder: no {'training' if train else 'test'} images in {top} "
                        f"(extensions {' '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: Path) -> torch.Tensor:
    """uint8 [28,28]: grayscale, resized as predict.py resizes; DataError when unreadable."""
    try:
        with Image.open(path) as img:
            small = img.convert("L")
            if small.size != (28, 28):
                small = small.resize((28, 28), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(28, 28)


def load_folder(root: Path, train: bool, test_fraction: float = Split.test_fraction) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-folder tree of images as 1-channel 28x28 uint8, labelled by subfolder."""
    files = folder_files(Path(root), train, test_fraction)
    images = torch.stack([load_image(p) for p, _ in files])
    return images, torch.tensor([c for _, c in files], dtype=torch.long)


class _ArrayUnpickler(pickle.Unpickler):
    """Only what a CIFAR batch holds (numpy arrays, lists, bytes): a batch file is data, never code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def load_cifar10(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``cifar-10-batches-py``: uint8 [N,3,32,32], labels 0..9."""
    folder = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        raise FileNotFoundError(f"put the cifar-10-batches-py folder ({', '.join(names)}) there")
    images, labels = [], []
    for n in names:
        try:
            with open(folder / n, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="latin1").load()
            data = torch.as_tensor(batch["data"], dtype=torch.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise DataError(f"cannot read {folder / n}: {exc}") from None
    images_t, labels_t = torch.cat(images), torch.cat(labels)
    if labels_t.shape != images_t.shape[:1]:
        raise DataError(f"{folder}: {labels_t.numel()} labels for {images_t.shape[0]} images")
    return images_t, _checked_labels(labels_t, 10, folder)
