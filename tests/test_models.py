"""--model: the built-in models by name, a user's package.module:factory, what derives from
the instance (layout, payload limits, WELCOME's terms), and whole runs with real processes:
a user's factory federated, a client with another model refused before training, a resumed
run with another model refused, CIFAR-10 batches trained by resnet-small, predict.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from procs import client_args, expect_exit, expect_run, log_of, run, server_args, start, stop
from test_datasets import write_cifar
from test_trainer_pool import same, updates_of

from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.client.trainer_pool import Task, TrainerPool
from fl.common.layout import Layout
from fl.learning import augment, models
from fl.learning.datasets import load_dataset
from fl.learning.quantization import quantize_state
from fl.server import checkpoint as ckpt
from fl.wire.errors import ProtocolError
from fl.wire.frames import DEFAULT_MAX_FRAME, encode_payload, frame_limit
from fl.wire.handshake import Mismatch, Terms
from fl.wire.safe_decode import STRICT, Limits, load

IMPROVED_CNN_LAYOUT = 0x217FF4CC38B0E2C7  # ImprovedCNN on 1x28x28, 10 classes: the state every MNIST run had
FACTORY = '''"""A user's own model, as docs/own-data.md shows it."""
from torch import nn


def build(input_shape, num_classes):
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * (height // 2) * (width // 2), num_classes))


def not_a_model(input_shape, num_classes):
    return "a string"


def broken(input_shape, num_classes):
    raise RuntimeError("this factory is broken")


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``mynet.py`` written to tmp_path and importable (here via sys.path, in subprocesses via PYTHONPATH)."""
    (tmp_path / "mynet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mynet", None)


@pytest.mark.parametrize("name", sorted(models.BUILTIN))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_built_in_takes_digits_and_cifar_images(name, shape):
    model = models.build(name, shape, 7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_improved_cnn_keeps_the_state_every_mnist_run_had():
    torch.manual_seed(0)
    model = models.build("improved-cnn", (1, 28, 28), 10)
    torch.manual_seed(0)
    from fl.learning.model import ImprovedCNN  # the old import path still works

    assert Layout.of(model.state_dict()).fingerprint == IMPROVED_CNN_LAYOUT
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ImprovedCNN().state_dict().values()))
    assert Layout.of(models.build("improved-cnn", (3, 32, 32), 10).state_dict()).fingerprint != IMPROVED_CNN_LAYOUT


def test_a_users_factory_is_imported_and_called_with_shape_and_classes(user_module):
    model = models.build("mynet:build", (3, 32, 32), 5)
    assert isinstance(model, torch.nn.Sequential) and model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    models.check_trainable("cifar10", "mynet:build")


@pytest.mark.parametrize("name, match", [
    ("nosuchmodule:build", r"--model nosuchmodule:build: cannot import nosuchmodule \(ModuleNotFoundError.*PYTHONPATH"),
    ("mynet:missing", r"--model mynet:missing: mynet has no callable 'missing'"),
    ("mynet:NOT_CALLABLE", r"mynet has no callable 'NOT_CALLABLE'"),
    ("mynet:not_a_model", r"--model mynet:not_a_model: the factory returned a str, not a torch.nn.Module"),
    ("mynet:broken", r"--model mynet:broken cannot be built for 1x28x28 images of 10 classes \(RuntimeError: this"),
    ("resnet", r"unknown --model 'resnet': expected one of improved-cnn, resnet-small, mlp or package.module:factory"),
    ("os:system; rm", r"unknown --model"),
])
def test_a_model_that_cannot_be_had_is_one_line(user_module, name, match):
    with pytest.raises(ValueError, match=match) as err:
        models.build(name, (1, 28, 28), 10)
    assert "\n" not in str(err.value)


def test_payload_limits_are_strict_for_the_default_model_and_grow_with_a_larger_one():
    default = Layout.of(models.build("improved-cnn", (1, 28, 28), 10).state_dict())
    assert Limits.of(default) == STRICT and frame_limit(default) == DEFAULT_MAX_FRAME
    deep = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(60)])  # 120 tensors: a 360-tensor 8-bit delta
    layout = Layout.of(deep.state_dict())
    body = encode_payload({"delta": quantize_state({k: v.detach() for k, v in deep.state_dict().items()})})
    with pytest.raises(ProtocolError, match=f"archive of 366 entries \\(at most {STRICT.entries}\\)"):
        load(body)
    assert len(load(body, Limits.of(layout))["delta"]) == 120
    too_deep = encode_payload({"x": [torch.zeros(1) for _ in range(2 * Limits.of(layout).tensors)]})
    with pytest.raises(ProtocolError, match=r"entries \(at most \d+\)"):  # still bounded
        load(too_deep, Limits.of(layout))
    big = Layout.of(torch.nn.Linear(2048, 2048).state_dict())  # 16 MiB of float32
    assert frame_limit(big) > 32 * 2**20


def test_terms_name_both_models_when_they_differ():
    ours = Terms("improved-cnn", IMPROVED_CNN_LAYOUT, "mnist")
    ours.check(Terms("improved-cnn", IMPROVED_CNN_LAYOUT, "mnist"))
    with pytest.raises(Mismatch, match=r"the server trains --model resnet-small \(layout 0*1\), this client has "
                                       r"--model improved-cnn \(layout 217ff4cc38b0e2c7\): start the client with "
                                       r"--model resnet-small"):
        ours.check(Terms("resnet-small", 1, "mnist"))
    with pytest.raises(Mismatch, match=r"the same name: the factory or the folder's classes differ\)"):
        ours.check(Terms("improved-cnn", 2, "mnist"))
    with pytest.raises(Mismatch, match="the server trains on --dataset cifar10, this client on mnist"):
        ours.check(Terms("improved-cnn", IMPROVED_CNN_LAYOUT, "cifar10"))


def test_a_checkpoint_resumes_only_with_its_model_and_dataset():
    saved = {"config": {"model": "resnet-small", "dataset": "mnist"}, "layout": 5}
    ckpt.check_run(saved, "resnet-small", "mnist", 5)
    with pytest.raises(ValueError, match=r"it trained --model resnet-small on --dataset mnist, this run --model mlp"):
        ckpt.check_run(saved, "mlp", "mnist", 7)
    with pytest.raises(ValueError, match="another layout"):
        ckpt.check_run(saved, "resnet-small", "mnist", 6)
    ckpt.check_run({"config": {}}, "improved-cnn", "mnist", IMPROVED_CNN_LAYOUT)  # from before the seam


def test_a_pool_trains_the_runs_model_on_the_runs_dataset(tmp_path):
    """Training processes load the run's dataset and build its model: the same updates as in-process."""
    write_cifar(tmp_path, n=12)
    images, labels = load_dataset("cifar10", tmp_path, train=True, download=False)
    state = {k: v.clone() for k, v in models.build("resnet-small", (3, 32, 32), 10).state_dict().items()}
    clients = {0: ClientConfig(seed=1, progress=False), 1: ClientConfig(seed=1, progress=False)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        host = Host(images, labels, torch.device("cpu"), model=models.build("resnet-small", (3, 32, 32), 10),
                    augment=augment.for_dataset("cifar10"))
        local = updates_of(host, clients, state, concurrently=False)
    finally:
        torch.set_num_threads(threads)
    pool = TrainerPool(2, str(tmp_path), False, torch.device("cpu"), task=Task("resnet-small", "cifar10"))
    try:
        pooled = updates_of(pool, clients, state, concurrently=True)
    finally:
        pool.close()
    for cid in clients:
        assert all(same(got, want) for got, want in zip(pooled[cid], local[cid], strict=True))


# --- whole runs: the real server.py, client.py and worker.py ------------------------------

def finish(tmp_path, server, clients) -> dict:
    """Wait for a whole run to end; the last metrics line."""
    expect_run(server, tmp_path / "server.log", [(proc, tmp_path / f"c{i}.log") for i, proc in enumerate(clients)])
    return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])

def test_a_users_factory_federates_resumes_only_with_it_and_predicts(tmp_path, synthetic_mnist_dir, free_port,
                                                                      user_module):
    path = {"PYTHONPATH": str(user_module)}
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 2, "--model", "mynet:build",
                                             "--test-limit", 100), log=tmp_path / "server.log", **path)
    clients = [start("client.py", *client_args(free_port, i, 2, synthetic_mnist_dir, "--model", "mynet:build",
                                               "--limit", 100), log=tmp_path / f"c{i}.log", **path) for i in range(2)]
    record = finish(tmp_path, server, clients)
    assert record["round"] == 1 and record["clients"] == 2
    saved = ckpt.load(tmp_path / "ckpt.pt")
    layout = Layout.of(models.build("mynet:build", (1, 28, 28), 10).state_dict()).fingerprint
    assert saved["config"]["model"] == "mynet:build" and saved["layout"] == layout
    assert list(saved["model"]) == ["0.weight", "0.bias", "4.weight", "4.bias"]

    resumed = run("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 2, 2, "--model", "resnet-small",
                                            "--resume"))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "it trained --model mynet:build on --dataset mnist, this run --model resnet-small on --dataset mnist" \
        in resumed.stderr.strip().splitlines()[-1]

    png = tmp_path / "seven.png"
    Image.new("L", (28, 28), 0).save(png)
    done = run("predict.py", "--checkpoint", tmp_path / "ckpt.pt", "--evaluate", "--data-dir", synthetic_mnist_dir,
               png, **path)
    assert done.returncode == 0 and done.stdout.startswith(f"{png}: "), done.stderr
    assert "on 200 test images" in done.stdout
    unimportable = run("predict.py", "--checkpoint", tmp_path / "ckpt.pt", png)
    assert unimportable.returncode == 2
    assert unimportable.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'ckpt.pt'} was trained with --model mynet:build: cannot import mynet "
        "(ModuleNotFoundError: No module named 'mynet'); is its folder on PYTHONPATH?"]


def test_a_client_with_another_model_exits_2_before_training_and_a_bare_one_adopts_the_servers(
        tmp_path, synthetic_mnist_dir, free_port):
    server = start("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 1, "--model", "resnet-small",
                                             "--test-limit", 50), log=tmp_path / "server.log")
    try:
        other = start("client.py", *client_args(free_port, 0, 2, synthetic_mnist_dir, "--model", "improved-cnn"),
                      log=tmp_path / "other.log")
        expect_exit(other, tmp_path / "other.log", timeout=60, code=2)
        virtual = start("worker.py", "--client-ids", "0-1", "--num-clients", 2, "--port", free_port, "--data-dir",
                        synthetic_mnist_dir, "--no-download", "--no-progress", "--model", "mlp", log=tmp_path / "w.log")
        expect_exit(virtual, tmp_path / "w.log", timeout=60, code=2)
        bare = start("client.py", "--port", free_port, "--data-dir", synthetic_mnist_dir, "--no-download",
                     "--no-progress", "--limit", 60, "--threads", 1, log=tmp_path / "bare.log")
        expect_exit(server, tmp_path / "server.log", timeout=120)
        expect_exit(bare, tmp_path / "bare.log", timeout=30)
    finally:
        stop(server)
    layout = Layout.of(models.build("resnet-small", (1, 28, 28), 10).state_dict()).fingerprint
    for log, model in (("other.log", "improved-cnn"), ("w.log", "mlp")):
        text = log_of(tmp_path / log)
        refusals = [line for line in text.splitlines() if "ERROR" in line and "the server trains" in line]
        assert refusals and all(f"the server trains --model resnet-small (layout {layout:016x}), this client has "
                                f"--model {model} (layout " in e for e in refusals), text
        assert "round 1" not in text and "Traceback" not in text  # trained nothing
    assert len([line for line in log_of(tmp_path / "other.log").splitlines() if "ERROR" in line]) == 1
    assert "model resnet-small (0.31 MB, layout " in log_of(tmp_path / "bare.log")  # adopted from WELCOME
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["round"] == 1 and record["clients"] == 1  # the bare client only (its id: the lowest never seen)


def test_cifar10_batches_federate_with_resnet_small_and_predict_follows(tmp_path, free_port):
    data = tmp_path / "data"
    write_cifar(data, n=40)
    server = start("server.py", *server_args(free_port, tmp_path, data, 1, 2, "--dataset", "cifar10",
                                             "--model", "resnet-small", "--num-shards", 2), log=tmp_path / "server.log")
    clients = [start("client.py", "--port", free_port, "--data-dir", data, "--no-download", "--no-progress",
                     "--threads", 1, log=tmp_path / f"c{i}.log") for i in range(2)]
    record = finish(tmp_path, server, clients)
    assert "of cifar10 on cpu, model resnet-small (" in log_of(tmp_path / "c0.log")  # both adopted from WELCOME
    assert record["round"] == 1 and record["clients"] == 2 and record["samples"] == 200
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    done = run("predict.py", "--checkpoint", tmp_path / "ckpt.pt", "--data-dir", data, "--evaluate", photo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{photo}: ") and "on 40 test images" in done.stdout


def test_welcome_carries_the_terms_in_its_schema():
    from fl.wire.control import decode_control, encode_control

    terms = {"model": "pkg.sub.mynet:build", "layout": IMPROVED_CNN_LAYOUT, "dataset": "cifar10"}
    assert decode_control("WELCOME", encode_control("WELCOME", {"proof": None, **terms})) == {"proof": None, **terms}
    for bad in ({**terms, "model": "mynet:build; rm -rf"}, {**terms, "layout": -1}, {**terms, "model": "A" * 33}):
        with pytest.raises(ProtocolError, match=r"WELCOME\.(model must be|layout = -1 is out of range)"):
            encode_control("WELCOME", {"proof": None, **bad})
