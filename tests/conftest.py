"""Shared fixtures: real MNIST when present, a small learnable synthetic stand-in otherwise."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from fl.learning.data import MNIST_FILES, write_idx

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
HAVE_REAL_MNIST = all((SHARED_MNIST / name).is_file() for name in MNIST_FILES)


def make_synthetic_images(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One blocky template per class (same for every split) plus noise: learnable, not constant.

    Templates live on a 5x5 grid of 4-pixel cells in the centre, so the 4-pixel border stays
    background and the ±10% shifts of augmentation keep classes apart.
    """
    coarse = torch.rand(10, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5  # fixed
    g = torch.Generator().manual_seed(seed)  # per-split noise
    templates = torch.zeros(10, 28, 28)
    templates[:, 4:24, 4:24] = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2).float()
    n = labels.numel()
    ink = 170 + 85 * torch.rand(n, 1, 1, generator=g)
    images = templates[labels] * ink
    salt = torch.rand(n, 28, 28, generator=g) < 0.03
    images[salt] = 255 * torch.rand(int(salt.sum()), generator=g)
    return images.round().clamp(0, 255).to(torch.uint8)


def write_synthetic_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Write the four standard gzipped IDX files (balanced, shuffled labels) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", make_synthetic_images(labels, seed))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    return root


@pytest.fixture(scope="session")
def synthetic_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"))


@pytest.fixture(scope="session")
def mnist_dir(request: pytest.FixtureRequest) -> Path:
    """Real MNIST; in CI its absence is a failure, so the real-data tests never skip silently."""
    if HAVE_REAL_MNIST:
        return SHARED_MNIST
    if os.environ.get("CI"):
        pytest.fail(f"real MNIST missing at {SHARED_MNIST} (need {', '.join(MNIST_FILES)})")
    return request.getfixturevalue("synthetic_mnist_dir")


@pytest.fixture(scope="session")
def mnist_is_real(mnist_dir: Path) -> bool:
    return mnist_dir == SHARED_MNIST


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pair():
    """Two connected sockets, closed after the test."""
    a, b = socket.socketpair()
    yield a, b
    for s in (a, b):
        try:
            s.close()
        except OSError:
            pass
