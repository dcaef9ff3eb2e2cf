"""Use the trained global model: classify your own images, or re-check it on the run's test set.

    python predict.py --checkpoint checkpoint.pt seven.png photo_of_a_3.jpg
    python predict.py --checkpoint checkpoint.pt --evaluate --data-dir data
    python predict.py --checkpoint checkpoint.pt --data-dir my_images photo.jpg   # a --dataset folder run

The model and the dataset are the checkpoint's (``--dataset`` overrides the dataset); a
model given as package.module:factory must be importable here (on PYTHONPATH). Images are
made to look like the training images first: the dataset's channels and size (grayscale
28x28, or colour 32x32 for CIFAR-10), and for the IDX sets (MNIST and its kin) light on
dark; a folder run's images are taken as they are and named by its class subfolders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from fl.common.cli import HelpFormatter
from fl.learning import models
from fl.learning.config import DATASETS, Split
from fl.learning.data import DataError, resolve_data_dir, to_float
from fl.learning.datasets import folder_classes, load_dataset
from fl.learning.training import evaluate
from fl.server import checkpoint as ckpt

IDX_SETS = ("mnist", "fashion-mnist", "kmnist", "emnist-")  # light on dark: a dark-on-light scan is inverted


def _load(path: str | Path, dataset: str | None = None, data_dir: Path | None = None) -> tuple[torch.nn.Module, int, dict]:
    """(model in eval mode, round, settings) of a checkpoint: the model it names, built for
    ``dataset`` (default: its own) whose folder's classes are in ``data_dir``."""
    try:
        state = ckpt.load(path)
    except FileNotFoundError:
        raise ValueError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    settings = state.get("config") if isinstance(state.get("config"), dict) else {}
    name, dataset = settings.get("model", models.DEFAULT), dataset or settings.get("dataset", Split.dataset)
    try:
        model = models.for_dataset(name, dataset, data_dir)
    except ValueError as exc:
        raise ValueError(f"{path} was trained with {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise ValueError(f"{path}: its weights do not fit --model {name} for --dataset {dataset}") from None
    return model.eval(), int(state.get("round", 0)), settings


def load_model(path: str | Path, dataset: str | None = None, data_dir: Path | None = None) -> torch.nn.Module:
    """The checkpoint's global model in eval mode; ValueError (one line) if unusable."""
    return _load(path, dataset, data_dir)[0]


def load_image(path: str | Path, invert: bool = True, shape: tuple[int, int, int] = (1, 28, 28)) -> torch.Tensor:
    """uint8 [H,W] (one channel) or [3,H,W] of ``shape``; with ``invert`` a one-channel
    image is white on black like MNIST (dark-on-light scans are inverted)."""
    channels, height, width = shape
    try:
        with Image.open(path) as img:
            small = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.LANCZOS)
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    x = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    if channels != 1:
        return x.reshape(height, width, channels).permute(2, 0, 1).contiguous()
    x = x.reshape(height, width)
    return 255 - x if invert and x.float().mean() > 127 else x


@torch.inference_mode()
def predict_images(model: torch.nn.Module, paths: list[str | Path], invert: bool = True,
                   shape: tuple[int, int, int] = (1, 28, 28)) -> list[tuple[int, float]]:
    """(class, confidence 0..1) for each image of the model's input ``shape``, in order."""
    if not paths:
        return []
    model.eval()
    device = next(model.parameters()).device
    batch = to_float(torch.stack([load_image(p, invert, shape) for p in paths])).to(device)
    conf, digit = torch.softmax(model(batch), dim=1).max(dim=1)
    return [(int(d), float(c)) for d, c in zip(digit, conf)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify (PNG, JPG, ...)")
    p.add_argument("--checkpoint", default="checkpoint.pt", help="checkpoint written by server.py, or a bare state_dict")
    p.add_argument("--evaluate", action="store_true", help="report accuracy and loss on the dataset's test images")
    p.add_argument("--dataset", choices=DATASETS, default=None, metavar="NAME",
                   help="the images' dataset (default: the checkpoint's, else mnist)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset's files, a folder run's class subfolders (default: $MNIST_DATA_DIR "
                        "or ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download the dataset's files")
    args = p.parse_args(argv)
    if not args.images and not args.evaluate:
        p.error("give IMAGE files to classify and/or --evaluate")
    try:
        data_dir = resolve_data_dir(args.data_dir)
        model, round_num, settings = _load(args.checkpoint, args.dataset, data_dir)
        dataset = args.dataset or settings.get("dataset", Split.dataset)
        names = folder_classes(data_dir) if dataset == "folder" and args.images else []
        shape = models.input_of(dataset)[0]
        for path, (label, conf) in zip(args.images, predict_images(model, args.images, dataset.startswith(IDX_SETS),
                                                                    shape)):
            print(f"{path}: {names[label] if label < len(names) else label} ({100 * conf:.1f}%)")
        if args.evaluate:
            images, labels = load_dataset(dataset, data_dir, train=False, download=not args.no_download,
                                          test_fraction=settings.get("test_fraction", Split.test_fraction))
            loss, accuracy = evaluate(model, images, labels)
            print(f"accuracy {100 * accuracy:.2f}% loss {loss:.4f} on {len(labels)} test images "
                  f"({args.checkpoint}, round {round_num})")
    except (ValueError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
