"""The loaders of ``--dataset``, run on small synthetic files in each format: IDX under the
other sets' names and folders, a class-folder tree of PNGs, torchvision's CIFAR batches."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl.learning import datasets
from fl.learning.config import DATASETS
from fl.learning.data import DataError, write_idx
from fl.learning.datasets import folder_classes, load_dataset
from fl.learning.models import check_trainable


def write_idx_set(folder: Path, name: str, n: int = 40, classes: int = 10, gz: bool = True) -> torch.Tensor:
    """Both parts of an IDX set under ``name``'s file names; returns the train images."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(len(name))
    train = None
    for is_train in (True, False):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = (torch.arange(n) % classes).to(torch.uint8)
        stems = datasets.idx_stems(name, is_train)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{stems[0]}{suffix}", images)
        write_idx(folder / f"{stems[1]}{suffix}", labels)
        train = images if is_train else train
    return train


@pytest.mark.parametrize("name, sub, gz", [("fashion-mnist", "", True), ("fashion-mnist", "FashionMNIST/raw", False),
                                           ("kmnist", "KMNIST/raw", True), ("kmnist", "", False)])
def test_the_other_idx_sets_load_from_a_flat_folder_or_torchvisions(tmp_path, name, sub, gz):
    written = write_idx_set(tmp_path / sub, name, gz=gz)
    images, labels = load_dataset(name, tmp_path, train=True, download=False)
    assert torch.equal(images, written) and labels.dtype == torch.long
    assert labels.tolist() == [i % 10 for i in range(40)]
    assert load_dataset(name, tmp_path, train=False, download=False)[0].shape == (40, 28, 28)


def test_emnist_reads_its_own_names_and_turns_the_images_upright(tmp_path):
    written = write_idx_set(tmp_path / "gzip", "emnist-digits")
    images, _ = load_dataset("emnist-digits", tmp_path, train=True, download=False)
    assert torch.equal(images, written.transpose(1, 2))
    write_idx_set(tmp_path / "EMNIST" / "raw", "emnist-letters", classes=27, gz=False)
    assert int(load_dataset("emnist-letters", tmp_path, train=False, download=False)[1].max()) == 26


def test_a_missing_set_says_which_files_to_put_where_in_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("kmnist", tmp_path, train=False, download=False)
    msg = str(err.value)
    assert "\n" not in msg and f"kmnist not found in {tmp_path} (download disabled)" in msg
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in msg


def test_a_download_goes_through_torchvision_and_its_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tv

    def fake_download(root, train, download, **kwargs):  # what torchvision leaves on disk
        write_idx_set(Path(root) / "FashionMNIST" / "raw", "fashion-mnist", gz=False)

    monkeypatch.setattr(tv, "FashionMNIST", fake_download)
    assert load_dataset("fashion-mnist", tmp_path, train=True)[0].shape == (40, 28, 28)

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv, "KMNIST", offline)
    with pytest.raises(DataError, match=r"kmnist not found in .* \(and download failed\): put "):
        load_dataset("kmnist", tmp_path / "empty", train=True)


def test_idx_labels_beyond_the_sets_classes_are_refused(tmp_path):
    write_idx_set(tmp_path, "fashion-mnist", classes=12)
    with pytest.raises(DataError, match=r"labels 0..11 are outside 0..9"):
        load_dataset("fashion-mnist", tmp_path, train=True, download=False)


def test_every_set_is_trainable_by_the_built_in_models_and_an_unknown_set_is_one_line():
    for name in DATASETS:
        for model in ("improved-cnn", "resnet-small"):
            check_trainable(name, model)  # a forward pass of the set's image shape
    with pytest.raises(ValueError, match="unknown --dataset 'svhn'"):
        check_trainable("svhn")


# --- folder: a class-folder tree of images ------------------------------------------------

def write_png(path: Path, value: int, size=(28, 28), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def write_tree(root: Path, per_class: int = 10, classes=("cat", "dog", "fish")) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:03d}.png", 20 * c + i)


def test_a_folder_with_train_and_test_uses_them_labelled_by_sorted_subfolder(tmp_path):
    for part, n in (("train", 4), ("test", 2)):
        write_tree(tmp_path / part, n, classes=("zebra", "ant"))
    write_png(tmp_path / "train" / "ant" / "big.jpg", 200, size=(64, 48), mode="RGB")  # converted, resized
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    images, labels = load_dataset("folder", tmp_path, train=True)
    assert folder_classes(tmp_path) == ["ant", "zebra"]
    assert images.shape == (9, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 5 + [1] * 4
    assert int(images[4].float().mean().round()) == 200  # big.jpg, sorted after 000..003.png
    test_images, test_labels = load_dataset("folder", tmp_path, train=False)
    assert test_images.shape == (4, 28, 28) and test_labels.tolist() == [0, 0, 1, 1]


def test_a_flat_folder_holds_out_a_fixed_seeded_fraction_disjoint_from_training(tmp_path):
    write_tree(tmp_path, per_class=10)
    train = datasets.folder_files(tmp_path, True, 0.2)
    test = datasets.folder_files(tmp_path, False, 0.2)
    assert len(test) == 6 and len(train) == 24 and not {p for p, _ in train} & {p for p, _ in test}
    assert datasets.folder_files(tmp_path, False, 0.2) == test  # the same files in every process
    images, labels = load_dataset("folder", tmp_path, train=False, test_fraction=0.2)
    assert images.shape == (6, 28, 28)
    assert [int(v) for v in images[:, 0, 0]] == [20 * c + int(p.stem) for p, c in test]
    assert labels.tolist() == [c for _, c in test]


@pytest.mark.parametrize("classes, match", [(("only",), r"has 1 class subfolders; a run needs 2..1000")])
def test_a_folder_with_too_few_or_too_many_classes_is_refused(tmp_path, classes, match):
    write_tree(tmp_path, 1, classes)
    with pytest.raises(DataError, match=match):
        load_dataset("folder", tmp_path, train=True)


def test_a_missing_folder_an_empty_one_and_a_broken_image_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("folder", tmp_path / "nowhere", train=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no training images in"):
        load_dataset("folder", tmp_path, train=True)
    write_tree(tmp_path, 5, ("a", "b"))
    (tmp_path / "a" / "999.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cannot read image .*999.png"):
        [load_dataset("folder", tmp_path, train=t) for t in (True, False)]


# --- cifar10: torchvision's python batches ------------------------------------------------

def write_cifar(root: Path, n: int = 6) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10 for i in range(n)], "batch_label": name}, f)
        first = data if first is None else first
    return first


def test_cifar10_batches_load_as_3x32x32(tmp_path):
    first = write_cifar(tmp_path)
    images, labels = load_dataset("cifar10", tmp_path, train=True, download=False)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[0], torch.from_numpy(first[0]).reshape(3, 32, 32))
    assert labels[:6].tolist() == [0, 1, 2, 3, 4, 5]
    assert load_dataset("cifar10", tmp_path, train=False, download=False)[0].shape == (6, 3, 32, 32)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_a_cifar_batch_that_would_run_code_is_refused_not_run(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _Exploit(), "labels": []}, f)
    with pytest.raises(DataError, match=r"test_batch: posix.system is not allowed|system is not allowed"):
        load_dataset("cifar10", tmp_path, train=False, download=False)
    with pytest.raises(DataError, match=r"cifar10 not found .*put the cifar-10-batches-py folder"):
        load_dataset("cifar10", tmp_path / "none", train=True, download=False)


@pytest.mark.parametrize("script", ["server.py", "client.py", "simulate.py"])
def test_cifar10_with_a_model_for_digits_only_is_one_line_and_exit_2_on_every_command(script, tmp_path):
    from procs import run

    (tmp_path / "digits_only.py").write_text(
        "from torch import nn\n\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))\n")
    extra = ["--out", tmp_path / "run", "--no-plot"] if script == "simulate.py" else ["--no-download"]
    done = run(script, "--dataset", "cifar10", "--model", "digits_only:build", "--data-dir", tmp_path, *extra,
               PYTHONPATH=str(tmp_path))
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--model digits_only:build cannot take --dataset cifar10's 3x32x32 images" in lines[-1]
