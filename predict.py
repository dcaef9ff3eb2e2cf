"""Use the trained global model: classify your own images, or re-check it on the run's test set.

    python predict.py --checkpoint checkpoint.pt seven.png photo_of_a_3.jpg
    python predict.py --checkpoint checkpoint.pt --evaluate --data-dir data
    python predict.py --checkpoint checkpoint.pt --data-dir my_images photo.jpg   # a --dataset folder run

The dataset is the checkpoint's (``--dataset`` overrides). Images are made to look like
the training images first: grayscale, 28x28, and for the IDX sets (MNIST and its kin) light
on dark; a folder run's images are taken as they are and named by its class subfolders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from fl.common.cli import HelpFormatter
from fl.learning.config import DATASETS, Split
from fl.learning.data import DataError, resolve_data_dir, to_float
from fl.learning.datasets import folder_classes, load_dataset
from fl.learning.model import ImprovedCNN
from fl.learning.training import evaluate
from fl.server import checkpoint as ckpt


def _load(path: str | Path) -> tuple[ImprovedCNN, int, dict]:
    try:
        state = ckpt.load(path)
    except FileNotFoundError:
        raise ValueError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    model = ImprovedCNN()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise ValueError(f"{path}: weights do not fit ImprovedCNN") from None
    settings = state.get("config")
    return model.eval(), int(state.get("round", 0)), settings if isinstance(settings, dict) else {}


def load_model(path: str | Path) -> ImprovedCNN:
    """The checkpoint's global model in eval mode; ValueError (one line) if unusable."""
    return _load(path)[0]


def load_image(path: str | Path, invert: bool = True) -> torch.Tensor:
    """uint8 [28,28]; with ``invert`` white on black like MNIST (dark-on-light scans are inverted)."""
    try:
        with Image.open(path) as img:
            small = img.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    x = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(28, 28)
    return 255 - x if invert and x.float().mean() > 127 else x


@torch.inference_mode()
def predict_images(model: ImprovedCNN, paths: list[str | Path], invert: bool = True) -> list[tuple[int, float]]:
    """(class, confidence 0..1) for each image, in order."""
    if not paths:
        return []
    model.eval()
    device = next(model.parameters()).device
    batch = to_float(torch.stack([load_image(p, invert) for p in paths])).to(device)
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
        model, round_num, settings = _load(args.checkpoint)
        dataset = args.dataset or settings.get("dataset", Split.dataset)
        data_dir = resolve_data_dir(args.data_dir)
        names = folder_classes(data_dir) if dataset == "folder" and args.images else []
        for path, (label, conf) in zip(args.images, predict_images(model, args.images, dataset != "folder")):
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
