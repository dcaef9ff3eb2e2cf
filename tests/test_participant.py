"""The client's pure helpers: client-side DP clipping of the whole state (steps/clip.py),
local training (local.py), the training config a client obeys, and joining: the shard and
split a client started without them is given in WELCOME."""
from __future__ import annotations

import json
import socket

import pytest
import torch
from procs import Worker, run

from fl.client import local, participant
from fl.client.config import ClientConfig
from fl.client.steps.clip import clip_delta
from fl.common.layout import Layout
from fl.learning.config import Split, TrainingConfig
from fl.learning.model import ImprovedCNN
from fl.wire.credentials import KeyRing
from fl.wire.errors import ProtocolError, RemoteError
from fl.wire.frames import Connection, MsgType, encode_body
from fl.wire.handshake import AuthError, client_handshake, proof, server_handshake, transcript, welcome_hash


def test_clip_delta_bounds_the_float_delta_and_keeps_the_counters():
    base = ImprovedCNN().state_dict()
    local = {k: v + 0.1 if v.is_floating_point() else v + 5 for k, v in base.items()}
    clipped = clip_delta(local, base, 1.0)
    layout = Layout.of(base)
    delta = layout.flatten(clipped)[0] - layout.flatten(base)[0]
    assert float(delta.double().norm()) == pytest.approx(1.0, rel=1e-4)
    before = layout.flatten(local)[0] - layout.flatten(base)[0]
    assert torch.allclose(delta, before * (1.0 / float(before.double().norm())), atol=1e-6)
    for k, v in local.items():
        if not v.is_floating_point():
            assert torch.equal(clipped[k], v)
    small = {k: v + 1e-6 if v.is_floating_point() else v for k, v in base.items()}
    unchanged = clip_delta(small, base, 1.0)
    assert all(torch.allclose(unchanged[k], small[k]) for k in small)


@pytest.mark.parametrize("sent, expected", [
    ({}, ("adam", 0.0, 0.0, False)),  # a server that names none of these: as before the keys existed
    ({"optimizer": "sgd", "momentum": 0.9, "mu": 0.01, "freeze_bn": True}, ("sgd", 0.9, 0.01, True)),
])
def test_fit_trains_with_the_optimizer_the_server_named(monkeypatch, sent, expected):
    seen = {}

    def fake_train(model, images, labels, config, **kwargs):
        seen["config"] = config
        return "result"

    monkeypatch.setattr(local, "train", fake_train)
    model = torch.nn.Linear(2, 2)
    config = TrainingConfig.from_wire({"epochs": 1, "lr": 0.05, "batch_size": 4, **sent})
    local.fit(model, torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), None,
              client_id=3, seed=0, round_num=1, config=config, base=model.state_dict())
    seen = seen["config"]
    assert (seen.optimizer, seen.momentum, seen.proximal_mu, seen.freeze_bn) == expected
    assert seen.lr == 0.05


def test_fit_returns_a_copy_that_the_next_client_on_the_same_model_leaves_alone():
    """Hosts train client after client on one model: a returned state aliasing the model's
    tensors (what ``.cpu()`` gives on the CPU) would turn into the last client's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    config = TrainingConfig(epochs=1, lr=0.1, batch_size=4, optimizer="sgd", augment=False)
    first = local.fit(model, images, torch.zeros(8, dtype=torch.long), None, 0, 0, 1, config, base)[0]
    kept = {k: v.clone() for k, v in first.items()}
    local.fit(model, images, torch.ones(8, dtype=torch.long), None, 1, 0, 1, config, base)
    for k in kept:
        assert torch.equal(first[k], kept[k]), k


def test_a_model_message_with_an_unusable_training_config_is_a_protocol_error():
    good = {"epochs": 1, "batch_size": 8, "lr": 0.1}
    assert participant.Participant.training_config({"config": good}) == TrainingConfig(epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(ProtocolError, match="unusable training config: unknown client optimizer 'evil'"):
        participant.Participant.training_config({"config": {**good, "optimizer": "evil"}})
    with pytest.raises(ProtocolError, match="lacks field 'config'"):
        participant.Participant.training_config({})


# --- joining: the shard and the split from the server's WELCOME ------------------------------

SECRET = b"s" * 32


def one_connection_server(port: int, welcome) -> Worker:
    """Accept one client on 127.0.0.1:``port``, run the server's side of the handshake by
    hand and answer with the WELCOME ``welcome(hello, digest)`` makes (raw JSON, unchecked)."""
    listener = socket.create_server(("127.0.0.1", port))

    def serve():
        with listener:
            listener.settimeout(30)
            sock, _ = listener.accept()
        with sock:
            conn = Connection(sock)
            hello = conn.recv(MsgType.HELLO, timeout=30)
            challenge = encode_body(MsgType.CHALLENGE, {"nonce": "ab" * 32, "auth": True})
            conn.send_payload(MsgType.CHALLENGE, challenge, timeout=5)
            conn.recv(MsgType.AUTH, timeout=5)
            conn.send_payload(MsgType.WELCOME, json.dumps(welcome(hello.body, transcript(bytes(hello.raw), challenge))
                                                          ).encode(), timeout=5)
            return hello.body
    return Worker(serve)


def test_a_bare_client_asks_to_join_without_an_id_and_gets_its_shard(free_port):
    split = Split(4, "dirichlet", 0.25, 3).to_wire()

    def welcome(hello, digest):
        extras = {"client_id": 2, "split": split}
        return {"proof": proof(SECRET, b"fl-server", welcome_hash(digest, extras)).hex(), **extras}

    server = one_connection_server(free_port, welcome)
    assert participant.join(ClientConfig(port=free_port, secret=SECRET, connect_timeout=10), None) == \
        (2, Split(4, "dirichlet", 0.25, 3), None)  # a server that does not say what it trains
    hello = server.get()
    assert hello["join"] is True and "client_id" not in hello and hello["num_samples"] == 0


def test_the_servers_proof_covers_the_split_it_sends(free_port):
    """A split changed in flight (here: by the server itself after proving) is refused."""
    def welcome(hello, digest):
        extras = {"client_id": 0, "split": Split(3).to_wire()}
        altered = {"client_id": 0, "split": Split(3, seed=1).to_wire()}
        return {"proof": proof(SECRET, b"fl-server", welcome_hash(digest, extras)).hex(), **altered}

    server = one_connection_server(free_port, welcome)
    with pytest.raises(AuthError, match="the server failed to prove the shared secret"):
        participant.join(ClientConfig(port=free_port, secret=SECRET, connect_timeout=10), None)
    server.get()


def test_a_malformed_welcome_is_one_line_and_exit_1_not_a_retry_loop(tmp_path, synthetic_mnist_dir, free_port):
    def welcome(hello, digest):
        return {"proof": "00" * 32, "client_id": 0, "split": {**Split(3).to_wire(), "alpha": "-1"}}

    server = one_connection_server(free_port, welcome)
    r = run("client.py", "--port", free_port, "--data-dir", synthetic_mnist_dir, "--no-download", "--no-progress",
            "--secret", SECRET.decode(), "--connect-timeout", 60, timeout=60)
    server.get()
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "ERROR" in line]
    assert errors == [errors[0]] and errors[0].endswith(
        "the server's WELCOME is malformed: WELCOME.split.alpha must be a decimal number such as 0.5"), errors


def test_the_server_handshake_wants_an_id_unless_the_client_joins_and_then_a_shared_secret(pair):
    client, server = pair
    hello = {"num_samples": 1, "options": {}, "nonce": "cd" * 32}
    Connection(client).send(MsgType.HELLO, hello, timeout=5)
    with pytest.raises(ProtocolError, match="HELLO lacks 'client_id'"):
        server_handshake(Connection(server), SECRET, timeout=5)

    a, b = socket.socketpair()
    with a, b:
        ring = KeyRing(per_client={0: SECRET})
        w = Worker(server_handshake, Connection(b), ring, 5)
        with pytest.raises(RemoteError, match="this server gives each client its own secret: start the client "
                                              "with its --client-id"):
            client_handshake(Connection(a), None, 0, {}, SECRET, timeout=5, join=True)
        assert isinstance(w.outcome(), AuthError)
