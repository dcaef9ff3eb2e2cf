"""Bringing one's own images: part of the real MNIST exported as a class-folder tree of
PNGs (``train/<digit>/*.png``, ``test/<digit>/*.png``) and federated with ``--dataset
folder`` by the real server.py and bare client.py processes, which learn the dataset from
the server's WELCOME; a client that names another dataset is refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from procs import expect_exit, expect_run, log_of, run, start, stop

import worker
from fl.learning.data import load_mnist, partition
from fl.learning.datasets import load_dataset

TRAIN, TEST, LIMIT = 3000, 500, 600


def export_png_tree(mnist_dir: Path, root: Path) -> Path:
    """The first TRAIN training and TEST test images of MNIST, one PNG per image, by label."""
    for part, train, n in (("train", True, TRAIN), ("test", False, TEST)):
        images, labels = load_mnist(mnist_dir, train=train, download=False)
        for i, (image, label) in enumerate(zip(images[:n], labels[:n].tolist())):
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def png_dir(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_png_tree(mnist_dir, tmp_path_factory.mktemp("mnist_png"))


def test_the_png_tree_reads_back_as_the_same_images(png_dir, mnist_dir):
    images, labels = load_dataset("folder", png_dir, train=False)
    real, real_labels = load_mnist(mnist_dir, train=False, download=False)
    assert images.shape == (TEST, 28, 28)
    # ImageFolder's order: by class, then by file name, which is the index in MNIST
    order = sorted(range(TEST), key=lambda i: (int(real_labels[i]), i))
    assert (images == real[order]).all() and labels.tolist() == real_labels[order].tolist()


def test_bare_clients_federate_a_png_folder_the_server_names(tmp_path, png_dir, free_port):
    common = ["--port", free_port, "--data-dir", png_dir, "--no-progress", "--no-download"]
    server = start("server.py", *common, "--dataset", "folder", "--rounds", 2, "--min-clients", 2,
                   "--num-shards", 2, "--threads", 1, "--checkpoint", tmp_path / "ckpt.pt",
                   "--metrics", tmp_path / "metrics.jsonl", log=tmp_path / "server.log")
    clients = [(start("client.py", *common, "--limit", LIMIT, "--threads", 1, log=tmp_path / f"c{i}.log"),
                tmp_path / f"c{i}.log") for i in range(2)]
    expect_run(server, tmp_path / "server.log", clients, timeout=300)
    assert f"test set: {TEST} images of folder" in log_of(tmp_path / "server.log")
    for _, log in clients:  # the dataset came from the server: the clients were given no --dataset
        assert f"{LIMIT} samples (iid split, alpha 0.5, seed 0, from the server) of folder" in log_of(log)
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert {c["client_id"] for r in rounds for c in r["per_client"]} == {0, 1}
    assert rounds[-1]["accuracy"] > 0.5, rounds[-1]  # chance is 0.1
    # predict.py follows the checkpoint's dataset: a folder run's images as they are, named by subfolder
    png = next((png_dir / "test" / "7").glob("*.png"))
    done = run("predict.py", "--checkpoint", tmp_path / "ckpt.pt", "--data-dir", png_dir, "--evaluate", png)
    assert done.returncode == 0, done.stderr
    assert f"on {TEST} test images" in done.stdout and done.stdout.startswith(f"{png}: ")


def test_a_client_naming_another_dataset_than_the_servers_is_refused_in_one_line(tmp_path, png_dir, mnist_dir,
                                                                                  free_port):
    server = start("server.py", "--port", free_port, "--data-dir", png_dir, "--dataset", "folder", "--no-download",
                   "--no-progress", "--rounds", 1, "--checkpoint", tmp_path / "ckpt.pt",
                   "--metrics", tmp_path / "metrics.jsonl", log=tmp_path / "server.log")
    log = tmp_path / "client.log"
    try:
        client = start("client.py", "--port", free_port, "--data-dir", mnist_dir, "--dataset", "mnist",
                       "--no-download", "--no-progress", log=log)
        expect_exit(client, log, timeout=60, code=2)
    finally:
        stop(server)
    errors = [line for line in log_of(log).splitlines() if "ERROR" in line]
    assert len(errors) == 1, log_of(log)
    assert "--dataset mnist: the server trains on folder; drop --dataset or give the server --dataset mnist" \
        in errors[0]
    assert "Traceback" not in log_of(log)


def test_a_worker_cuts_its_clients_shards_from_the_folder_it_is_given(png_dir):
    args = worker.parse_args(["--client-ids", "0-2", "--num-clients", "3", "--dataset", "folder",
                              "--data-dir", str(png_dir), "--no-download"])
    built = worker.build(args)
    _, labels = load_dataset("folder", png_dir, train=True)
    parts = partition(labels, 3, "iid", 0.5, 0)
    assert [p.indices.tolist() for p in built.participants] == [q.tolist() for q in parts]
