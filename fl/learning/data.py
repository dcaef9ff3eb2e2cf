"""MNIST loading and client sharding for the federated runs.

Images are decoded once from the IDX files into uint8 tensors so every batch is a
tensor slice, never a per-sample PIL round trip.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import random
import socket
import struct
from pathlib import Path

import torch

from fl.learning.config import SCHEMES, Split

DATA_DIR_ENV = "MNIST_DATA_DIR"
DEFAULT_DATA_DIR = "data"
MEAN, STD = 0.1307, 0.3081
RGB_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # CIFAR-10's train set

_STEMS = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The names a user has to provide, in the order the error message lists them.
MNIST_FILES = tuple(f"{stem}.gz" for stems in _STEMS.values() for stem in stems)
_UBYTE = 0x08
_DOWNLOAD_TIMEOUT_S = 15.0


class DataError(Exception):
    """Unusable or missing data; ``str(e)`` is one line a CLI can print before exiting 2."""


def resolve_data_dir(flag: str | None) -> Path:
    """An explicit flag wins so one run can override a shell-wide $MNIST_DATA_DIR."""
    return Path(flag or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def parse_idx(raw: bytes) -> torch.Tensor:
    """Decode IDX bytes strictly, so a corrupt or truncated download fails loudly here."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"not an IDX file (bad magic {bytes(raw[:4]).hex() or 'empty'})")
    if raw[2] != _UBYTE:
        raise DataError(f"unsupported IDX element type 0x{raw[2]:02x} (only uint8 0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX header: {len(raw)} bytes, need {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    if len(raw) - header != count:
        raise DataError(f"IDX payload is {len(raw) - header} bytes, dims {list(dims)} need {count}")
    if count == 0:
        return torch.empty(dims, dtype=torch.uint8)
    # bytearray copies the payload into memory the tensor owns (and makes it writable).
    return torch.frombuffer(bytearray(memoryview(raw)[header:]), dtype=torch.uint8).reshape(dims)


def write_idx(path: str | Path, tensor: torch.Tensor) -> None:
    """Inverse of parse_idx; lets tests fabricate MNIST-shaped files without a download."""
    if tensor.dtype != torch.uint8:
        raise ValueError(f"write_idx supports uint8 only, got {tensor.dtype}")
    header = bytes([0, 0, _UBYTE, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload = bytes(tensor.detach().cpu().flatten().clone().untyped_storage())
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + payload)


def find_mnist_file(data_dir: Path, stem: str) -> Path | None:
    """Accept both a flat folder and torchvision's ``MNIST/raw`` layout, gzipped or not."""
    for folder in (Path(data_dir), Path(data_dir) / "MNIST" / "raw"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx_file(path: Path) -> torch.Tensor:
    """One IDX file, gzipped or not; DataError (one line) naming the file."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return parse_idx(raw)
    except (OSError, EOFError, DataError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _try_download(data_dir: Path, train: bool) -> None:
    """Best effort only: offline machines must fail fast, not hang on a socket."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        from torchvision import datasets

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            datasets.MNIST(root=str(data_dir), train=train, download=True)
    except Exception:  # noqa: BLE001 - any failure just means "still missing"
        pass
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_mnist(
    data_dir: str | Path, train: bool, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (uint8 images [N,28,28], int64 labels [N]), validated so bad files fail early."""
    data_dir = Path(data_dir)
    stems = _STEMS[train]
    paths = [find_mnist_file(data_dir, s) for s in stems]
    if None in paths and download:
        _try_download(data_dir, train)
        paths = [find_mnist_file(data_dir, s) for s in stems]
    if None in paths:
        why = "and download failed" if download else "download disabled"
        raise DataError(
            f"MNIST not found in {data_dir} ({why}): put {', '.join(MNIST_FILES)} there, "
            f"or pass --data-dir / set {DATA_DIR_ENV}"
        )
    images, labels = (read_idx_file(p) for p in paths)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{paths[0]}: expected images of shape [N,28,28], got {list(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{paths[1]}: {list(labels.shape)} labels do not match {images.shape[0]} images"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} is outside 0..9")
    return images, labels.long()


def _dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    """Dirichlet via normalised gammas: seedable through one Random and numpy-free."""
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    return [d / total for d in draws] if total > 0 else [1.0 / k] * k


def _split_counts(n: int, props: list[float]) -> list[int]:
    """Round cumulative shares so the counts always add up to exactly n."""
    bounds, acc = [0], 0.0
    for p in props[:-1]:
        acc += p
        bounds.append(min(n, round(acc * n)))
    bounds.append(n)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _dirichlet_partition(
    labels: torch.Tensor, k: int, alpha: float, seed: int, min_size: int, gen: torch.Generator
) -> list[torch.Tensor]:
    if k * min_size > labels.numel():
        raise ValueError(f"{k} clients x min_size {min_size} exceeds the {labels.numel()} samples")
    by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    rng = random.Random(seed)
    for _ in range(100):
        counts = [_split_counts(len(idx), _dirichlet(rng, alpha, k)) for idx in by_class]
        if all(sum(col) >= min_size for col in zip(*counts)):
            break
    else:
        raise ValueError(
            f"dirichlet(alpha={alpha}) gave some client < {min_size} samples in 100 tries; "
            "raise alpha or lower num_clients"
        )
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for idx, cnt in zip(by_class, counts):
        for client, chunk in enumerate(torch.split(idx[torch.randperm(len(idx), generator=gen)], cnt)):
            parts[client].append(chunk)
    return [torch.cat(p) for p in parts]


def pathological_partition(
    labels: torch.Tensor, num_clients: int, seed: int = 0, shards_per_client: int = 2
) -> list[torch.Tensor]:
    """The FedAvg paper's pathological non-IID split (McMahan et al. 2017): sort the samples
    by label, cut them into ``shards_per_client * num_clients`` contiguous shards of equal
    size, and give every client ``shards_per_client`` of them drawn at random (seeded).

    With MNIST's 60,000 images and 100 clients: 200 shards of 300 images, so most clients
    see two digits (a shard that straddles a label boundary adds one, so 2-4 at most).
    When the count does not divide evenly, shard sizes differ by at most one. Pure: the
    same labels, count and seed give the same split in every process."""
    n = labels.numel()
    count = shards_per_client * num_clients
    if shards_per_client < 1 or count > n:
        raise ValueError(f"cannot cut {n} samples into {shards_per_client} shards for each of {num_clients} clients")
    # A stable sort keeps equal labels in index order, so the split depends on the labels only.
    by_label = torch.sort(labels.flatten(), stable=True).indices
    shards = torch.tensor_split(by_label, count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return [torch.cat([shards[s] for s in order[c * shards_per_client:(c + 1) * shards_per_client]])
            for c in range(num_clients)]


def subset(indices: torch.Tensor, limit: int | None, seed: int = 0) -> torch.Tensor:
    """At most ``limit`` of a client's indices, drawn at random (seeded), in the shard's order: the
    first ``limit`` would keep one label of a label-sorted shard (``pathological_partition``)."""
    if limit is None or limit >= indices.numel():
        return indices
    pick = torch.randperm(indices.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
    return indices[pick.sort().values]


def partition(
    labels: torch.Tensor,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[torch.Tensor]:
    """Split all sample indices among clients; every process derives the same split from the seed.

    ``min_size`` is enforced for "dirichlet" only; "iid" chunks differ by at most one;
    "shards" is the pathological two-shards-per-client split (``pathological_partition``).
    """
    n = labels.numel()
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients {num_clients} exceeds the {n} samples")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    if scheme == "iid":
        parts = list(torch.tensor_split(torch.randperm(n, generator=gen), num_clients))
    elif scheme == "dirichlet":
        parts = _dirichlet_partition(labels.flatten(), num_clients, alpha, seed, min_size, gen)
    elif scheme == "shards":
        parts = pathological_partition(labels, num_clients, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    return [p.sort().values.long() for p in parts]


def shard(
    labels: torch.Tensor,
    num_clients: int,
    client_id: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """This client's indices; clients never exchange splits, they recompute the same partition."""
    if num_clients >= 1 and not 0 <= client_id < num_clients:
        raise ValueError(
            f"--client-id {client_id} is out of range for --num-clients {num_clients} "
            f"(valid: 0..{num_clients - 1})"
        )
    return partition(labels, num_clients, scheme, alpha, seed)[client_id]


def split_shard(labels: torch.Tensor, split: Split, client_id: int) -> torch.Tensor:
    """Client ``client_id``'s indices under ``split`` (the server's, or a client's own flags)."""
    return shard(labels, split.num_shards, client_id, split.scheme, split.alpha, split.seed)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """Normalise: 1-channel images with the MNIST train statistics the models have always
    been trained and evaluated with, 3-channel ones with CIFAR-10's per-channel statistics."""
    x = images_u8.unsqueeze(1) if images_u8.dim() == 3 else images_u8
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected [B,H,W], [B,1,H,W] or [B,3,H,W] images, got {list(images_u8.shape)}")
    if x.shape[1] == 1:
        return (x.float() / 255.0 - MEAN) / STD
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in RGB_STATS)
    return (x.float() / 255.0 - mean) / std
