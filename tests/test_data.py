from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest
import torch

from fl.learning import data
from fl.learning.config import Split
from fl.learning.data import (
    MNIST_FILES,
    DataError,
    find_mnist_file,
    load_mnist,
    parse_idx,
    partition,
    pathological_partition,
    resolve_data_dir,
    shard,
    split_shard,
    to_float,
    write_idx,
)
from fl.wire.control import decode_control, encode_control
from fl.wire.errors import ProtocolError

# --- IDX -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    t = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    write_idx(tmp_path / name, t)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = parse_idx(gzip.decompress(raw) if name.endswith(".gz") else raw)
    assert back.dtype == torch.uint8 and torch.equal(back, t)
    back[0, 0, 0] ^= 1  # owns writable memory, independent of the bytes
    assert parse_idx(gzip.decompress(raw) if name.endswith(".gz") else raw)[0, 0, 0] == t[0, 0, 0]


def test_idx_header_layout() -> None:
    raw = b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert parse_idx(raw).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x.idx", torch.zeros(3, dtype=torch.float32))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc",  # bad magic
        b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc",  # float, unsupported
        b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"),  # truncated header
        b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abc",  # truncated payload
        b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc",  # trailing garbage
    ],
)
def test_parse_idx_rejects_bad_input(raw: bytes) -> None:
    with pytest.raises(DataError):
        parse_idx(raw)


# --- finding and loading -----------------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "MNIST/raw"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_find_mnist_file_layouts(tmp_path: Path, sub: str, suffix: str) -> None:
    stem = "train-labels-idx1-ubyte"
    assert find_mnist_file(tmp_path, stem) is None
    target = tmp_path / sub / f"{stem}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_idx(target, torch.zeros(3, dtype=torch.uint8))
    assert find_mnist_file(tmp_path, stem) == target
    assert find_mnist_file(tmp_path, "t10k-labels-idx1-ubyte") is None


@pytest.mark.parametrize("train,n", [(True, 600), (False, 200)])
def test_load_synthetic(synthetic_mnist_dir: Path, train: bool, n: int) -> None:
    images, labels = load_mnist(synthetic_mnist_dir, train=train, download=False)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert images.float().mean() > 5  # not blank


def test_synthetic_digits_are_learnable(synthetic_mnist_dir: Path) -> None:
    """Nearest class mean must transfer from train to test, or downstream training tests lie."""
    (xi, yi), (xt, yt) = (load_mnist(synthetic_mnist_dir, t, download=False) for t in (True, False))
    means = torch.stack([xi[yi == c].float().mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(xt.float().flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_load_real(mnist_dir: Path, mnist_is_real: bool) -> None:
    if not mnist_is_real:
        pytest.skip("real MNIST not available (allowed outside CI only)")
    for train, n in ((True, 60000), (False, 10000)):
        images, labels = load_mnist(mnist_dir, train=train, download=False)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        counts = torch.bincount(labels, minlength=10)
        assert counts.numel() == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
        assert images[:, 0, :].float().mean() < 0.5 and images.max() == 255  # black border, white ink
    assert 0.12 < to_float(images).mul(data.STD).add(data.MEAN).mean() < 0.15


def _assert_missing_message(err: DataError, folder: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(folder) in msg and "MNIST_DATA_DIR" in msg
    assert all(name in msg for name in MNIST_FILES)


def test_load_missing_without_download(tmp_path: Path) -> None:
    folder = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        load_mnist(folder, train=True, download=False)
    _assert_missing_message(ei.value, folder)
    assert not folder.exists()  # no download attempt created it


def test_load_download_failure_is_fast_data_error(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        print("Downloading ... noise that must not leak")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as ei:
        load_mnist(tmp_path, train=True)
    _assert_missing_message(ei.value, tmp_path)
    assert calls and calls[0]["download"] is True and calls[0]["train"] is True
    assert socket.getdefaulttimeout() == before


def test_load_after_download_finds_torchvision_layout(
    tmp_path: Path, synthetic_mnist_dir: Path, monkeypatch, capsys
) -> None:
    import torchvision.datasets

    def fake_mnist(root, train, download):
        assert socket.getdefaulttimeout() == data._DOWNLOAD_TIMEOUT_S
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for p in synthetic_mnist_dir.glob("t10k-*"):
            (raw / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))  # extracted
        print("Downloading http://...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    images, labels = load_mnist(tmp_path, train=False)
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    assert capsys.readouterr().out == ""


def _write_pair(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), "match"),
        (torch.zeros(5, 28, 27, dtype=torch.uint8), torch.zeros(5, dtype=torch.uint8), "28,28"),
        (torch.zeros(5, 28, 28, dtype=torch.uint8), torch.full((5,), 10, dtype=torch.uint8), "0..9"),
    ],
)
def test_load_validates(tmp_path: Path, images, labels, match: str) -> None:
    _write_pair(tmp_path, images, labels)
    with pytest.raises(DataError, match=match):
        load_mnist(tmp_path, train=False, download=False)


def test_load_corrupt_gzip_is_data_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(5, dtype=torch.uint8))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError) as ei:
        load_mnist(tmp_path, train=False, download=False)
    assert "t10k-images-idx3-ubyte.gz" in str(ei.value) and "\n" not in str(ei.value)


def test_resolve_data_dir_precedence(monkeypatch) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv(data.DATA_DIR_ENV, "/from/env")
    assert resolve_data_dir(None) == Path("/from/env")
    assert resolve_data_dir("/from/flag") == Path("/from/flag")


def test_to_float() -> None:
    u8 = torch.tensor([0, 255], dtype=torch.uint8).repeat(2, 28, 14)
    x = to_float(u8)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, to_float(u8.unsqueeze(1)))
    assert x.min().item() == pytest.approx(-data.MEAN / data.STD)
    assert x.max().item() == pytest.approx((1 - data.MEAN) / data.STD)


# --- partitioning ------------------------------------------------------------------------

BALANCED = torch.arange(6000) % 10


def _max_class_share(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    shares = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    return sum(shares) / len(shares)


@pytest.mark.parametrize("scheme,alpha", [("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.1), ("shards", 0.5)])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_partition_disjoint_covering_deterministic(scheme: str, alpha: float, k: int) -> None:
    torch.manual_seed(0)
    parts = partition(BALANCED, k, scheme, alpha=alpha, seed=7)
    assert len(parts) == k
    assert all(p.dtype == torch.int64 and torch.equal(p, p.sort().values) for p in parts)
    assert all(len(p) >= 10 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(BALANCED)))
    torch.manual_seed(123)  # global RNG must not matter
    assert all(torch.equal(a, b) for a, b in zip(parts, partition(BALANCED, k, scheme, alpha=alpha, seed=7)))
    if k > 1:
        other = partition(BALANCED, k, scheme, alpha=alpha, seed=8)
        assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_partition_iid_balanced() -> None:
    parts = partition(BALANCED[:1003], 10)
    assert {len(p) for p in parts} == {100, 101}
    assert _max_class_share(BALANCED, partition(BALANCED, 10)) < 0.2


def test_partition_dirichlet_is_label_skewed() -> None:
    skewed = _max_class_share(BALANCED, partition(BALANCED, 10, "dirichlet", alpha=0.1))
    mild = _max_class_share(BALANCED, partition(BALANCED, 10, "dirichlet", alpha=100.0))
    assert skewed > 0.5 and mild < 0.2


def test_partition_dirichlet_min_size() -> None:
    labels = BALANCED[:1000]
    sizes = lambda m: [len(p) for p in partition(labels, 10, "dirichlet", alpha=0.3, seed=4, min_size=m)]
    assert min(sizes(1)) < 30 <= min(sizes(30))  # the first draw is rejected and redrawn
    with pytest.raises(ValueError):
        partition(BALANCED[:100], 10, "dirichlet", min_size=11)  # impossible


def test_partition_dirichlet_real_labels(mnist_dir: Path) -> None:
    _, labels = load_mnist(mnist_dir, train=True, download=False)
    parts = partition(labels, 10, "dirichlet", alpha=0.1, seed=0)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))
    assert _max_class_share(labels, parts) > 0.5


def _shards_of(parts: list[torch.Tensor], size: int) -> list[set[int]]:
    """Which of the equal contiguous shards of the label-sorted order each client holds."""
    order = torch.sort(BALANCED, stable=True).indices
    shard_of = torch.empty_like(order)
    shard_of[order] = torch.arange(len(order)) // size
    return [set(shard_of[p].tolist()) for p in parts]


@pytest.mark.parametrize("k", [10, 100])
def test_pathological_partition_two_shards_per_client(k: int) -> None:
    """McMahan et al. 2017: sort by label, 2K equal shards, two per client, seeded."""
    parts = pathological_partition(BALANCED, k, seed=3)
    size = len(BALANCED) // (2 * k)
    assert len(parts) == k and all(len(p) == 2 * size for p in parts)
    held = _shards_of(parts, size)
    assert all(len(h) == 2 for h in held)  # exactly two whole shards each
    assert sorted(s for h in held for s in h) == list(range(2 * k))  # disjoint, all of them
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(BALANCED)))  # covers all
    labels_per_client = [len(torch.unique(BALANCED[p])) for p in parts]
    assert max(labels_per_client) <= 4 and min(labels_per_client) >= 1
    if k == 100:  # 300-sample shards inside 600-sample classes: one label per shard
        assert max(labels_per_client) <= 2
    assert all(torch.equal(a, b) for a, b in zip(parts, pathological_partition(BALANCED, k, seed=3)))
    assert _shards_of(pathological_partition(BALANCED, k, seed=4), size) != held


def test_pathological_partition_uneven_and_via_partition() -> None:
    labels = BALANCED[:1003]
    parts = partition(labels, 10, "shards", seed=1)
    assert {len(p) for p in parts} <= {100, 101, 102}  # 20 shards of 50 or 51
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1003))
    assert _max_class_share(labels, parts) > 0.5
    with pytest.raises(ValueError, match="shards"):
        pathological_partition(BALANCED[:15], 8)  # 16 shards of 15 samples


def test_pathological_partition_real_labels(mnist_dir: Path, mnist_is_real: bool) -> None:
    _, labels = load_mnist(mnist_dir, train=True, download=False)
    parts = partition(labels, 100, "shards", seed=0)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))
    assert max(len(torch.unique(labels[p])) for p in parts) <= 4
    if mnist_is_real:  # 200 shards of 300 images
        assert {len(p) for p in parts} == {600}
        assert sum(len(torch.unique(labels[p])) <= 2 for p in parts) >= 80


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_clients=0), dict(num_clients=10, scheme="pathological"),
     dict(num_clients=3, alpha=0.0), dict(num_clients=6001)],
)
def test_partition_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        partition(BALANCED, **kwargs)


def test_shard_matches_partition_and_checks_range() -> None:
    parts = partition(BALANCED, 3, "dirichlet", alpha=0.5, seed=1)
    for cid in range(3):
        assert torch.equal(shard(BALANCED, 3, cid, "dirichlet", alpha=0.5, seed=1), parts[cid])
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"valid: 0\.\.2"):
            shard(BALANCED, 3, bad)


def test_subset_draws_across_the_whole_shard_not_its_head():
    from fl.learning.data import pathological_partition, subset
    labels = torch.arange(10).repeat_interleave(100)  # sorted by label
    shard = pathological_partition(labels, 5, seed=0)[0]  # two label-contiguous shards of 100
    picked = subset(shard, 50, seed=1)
    assert picked.numel() == 50 and set(picked.tolist()) <= set(shard.tolist())
    order = {v: i for i, v in enumerate(shard.tolist())}
    assert [order[v] for v in picked.tolist()] == sorted(order[v] for v in picked.tolist())  # shard order kept
    assert len(set(labels[picked].tolist())) == len(set(labels[shard].tolist()))  # both labels kept
    assert torch.equal(subset(shard, 50, seed=1), picked) and not torch.equal(subset(shard, 50, seed=2), picked)
    assert subset(shard, None) is shard and subset(shard, 10_000) is shard


# --- Split: the server's settings for the shards, on the wire -----------------------------

@pytest.mark.parametrize("split", [Split(), Split(10, "dirichlet", 0.1, 7), Split(3, "shards", 1e-05, -2),
                                   Split(2, "dirichlet", 0.30000000000000004, 2**63 - 1),
                                   Split(4, dataset="fashion-mnist"), Split(5, dataset="folder", test_fraction=0.25)])
def test_split_travels_as_control_json_and_reads_back_as_the_same_shards(split: Split) -> None:
    wire = split.to_wire()
    assert decode_control("WELCOME", encode_control("WELCOME", {"proof": None, "client_id": 0, "split": wire}))[
        "split"] == wire  # no floats on the wire: alpha is its shortest decimal text
    assert Split.from_wire(wire) == split
    labels = torch.arange(600) % 10
    last = split.num_shards - 1
    assert torch.equal(split_shard(labels, Split.from_wire(wire), last),
                       shard(labels, split.num_shards, last, split.scheme, split.alpha, split.seed))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_shards": 0}, "num_shards must be an integer in 1..1000000, got 0"),
    ({"num_shards": True}, "num_shards must be an integer"),
    ({"scheme": "zipf"}, "unknown partition scheme 'zipf'"),
    ({"alpha": 0.0}, "alpha must be a positive number, got 0.0"),
    ({"alpha": float("nan")}, "alpha must be a positive number"),
    ({"seed": 2**63}, "seed must be a 64-bit integer"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"test_fraction": 1.0}, r"test_fraction must be a number in \(0, 1\), got 1.0"),
])
def test_split_refuses_bad_settings_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Split(**kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("alpha", "nan", r"WELCOME.split.alpha must be a decimal number"),
    ("alpha", 0.5, r"non-integer number 0.5 in a control message"),
    ("scheme", "IID!", r"WELCOME.split.scheme must be a scheme's name"),
    ("num_shards", 0, r"WELCOME.split.num_shards = 0 is out of range"),
    ("dataset", "MNIST; rm", r"WELCOME.split.dataset must be a dataset's name"),
    ("test_fraction", 0.1, r"non-integer number 0.1 in a control message"),
])
def test_a_malformed_split_on_the_wire_is_a_protocol_error(field: str, value, match: str) -> None:
    wire = {**Split().to_wire(), field: value}
    raw = json.dumps({"proof": None, "split": wire}).encode()
    with pytest.raises(ProtocolError, match=match):
        decode_control("WELCOME", raw)


def test_a_split_with_a_scheme_this_client_does_not_know_is_refused_by_its_meaning() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme 'zipf'"):
        Split.from_wire({**Split().to_wire(), "scheme": "zipf"})
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        Split.from_wire({**Split().to_wire(), "alpha": "0"})


def test_an_mnist_split_sends_what_older_clients_read_and_another_dataset_says_which() -> None:
    assert set(Split(3).to_wire()) == {"num_shards", "scheme", "alpha", "seed"}
    assert Split(3, dataset="kmnist").to_wire()["dataset"] == "kmnist"
    assert "test_fraction" not in Split(3, dataset="kmnist").to_wire()  # it only cuts a folder
    assert Split.from_wire({**Split(3).to_wire(), "dataset": "folder", "test_fraction": "0.2"}) == \
        Split(3, dataset="folder", test_fraction=0.2)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        Split.from_wire({**Split().to_wire(), "dataset": "svhn"})
