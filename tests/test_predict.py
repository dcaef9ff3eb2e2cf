"""predict.py: classify image files and re-evaluate a checkpoint, with one-line CLI errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from fl.learning.config import TrainingConfig
from fl.learning.data import load_mnist
from fl.learning.model import ImprovedCNN
from fl.learning.training import train
from fl.server import checkpoint


@pytest.fixture(scope="module")
def trained_checkpoint(synthetic_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImprovedCNN after 30 Adam steps on the synthetic digits (plenty for them), saved like the server does."""
    torch.manual_seed(0)
    model = ImprovedCNN()
    images, labels = load_mnist(synthetic_mnist_dir, train=True, download=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only fight a busy CI box
    try:
        train(model, images, labels, TrainingConfig(epochs=1, lr=1e-3, batch_size=20, augment=False),
              generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    checkpoint.save(path, model.state_dict(), 3, [], {})
    return path


@pytest.fixture(scope="module")
def test_pngs(synthetic_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[int]]:
    """40 synthetic test digits as files in the shapes users have: as-is, inverted scans, larger RGB."""
    images, labels = load_mnist(synthetic_mnist_dir, train=False, download=False)
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, img in enumerate(images[:40].numpy()):
        pil = Image.fromarray(img, mode="L")
        if i % 3 == 1:
            pil = Image.fromarray(255 - img, mode="L")  # dark digit on white paper
        elif i % 3 == 2:
            pil = pil.resize((84, 84), Image.Resampling.NEAREST).convert("RGB")
        path = folder / f"digit{i}.{'jpg' if i % 3 == 2 else 'png'}"
        pil.save(path)
        paths.append(path)
    return paths, labels[:40].tolist()


def test_predict_images_mostly_right(trained_checkpoint: Path, test_pngs: tuple[list[Path], list[int]]) -> None:
    model = predict.load_model(trained_checkpoint)
    assert not model.training
    paths, labels = test_pngs
    results = predict.predict_images(model, paths)
    assert len(results) == len(paths)
    assert all(0 <= d <= 9 and 0.0 <= c <= 1.0 for d, c in results)
    hits = [d == y for (d, _), y in zip(results, labels)]
    assert sum(hits) >= 0.8 * len(hits)
    for kind in range(3):  # each file shape (plain, inverted, RGB resized) is handled
        assert sum(hits[kind::3]) >= 0.7 * len(hits[kind::3])


def test_cli_prints_one_line_per_image(trained_checkpoint: Path, test_pngs: tuple[list[Path], list[int]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(p) for p in test_pngs[0][:3]]
    assert predict.main(["--checkpoint", str(trained_checkpoint), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}: ") and line.endswith("%)")


def test_bare_state_dict_loads(trained_checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(checkpoint.load(trained_checkpoint)["model"], bare)
    assert isinstance(predict.load_model(bare), ImprovedCNN)


def test_evaluate(trained_checkpoint: Path, synthetic_mnist_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(trained_checkpoint), "--evaluate", "--data-dir", str(synthetic_mnist_dir)]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ") and "loss" in out and "200 test images" in out


def test_errors_exit_2_with_one_line(trained_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt"), str(junk)], "checkpoint not found"),
        (["--checkpoint", str(junk), str(junk)], str(junk)),
        (["--checkpoint", str(trained_checkpoint), str(junk)], "cannot read image"),
        (["--checkpoint", str(trained_checkpoint), str(tmp_path / "gone.png")], "image not found"),
        (["--checkpoint", str(trained_checkpoint), "--evaluate", "--no-download",
          "--data-dir", str(tmp_path / "empty")], "MNIST not found"),
    ]
    for argv, expected in cases:
        assert predict.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and expected in captured.err
        assert captured.err.count("\n") == 1, captured.err


def test_needs_images_or_evaluate() -> None:
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", "x.pt"])
    assert exc.value.code == 2
