"""The server's round logic without sockets: submit, validate, fold, broadcast views."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

import server
from aggregation import FedAvg, fedavg
from client import update_message
from layout import Layout
from model import ImprovedCNN
from protocol import ProtocolError, encode_payload
from quantization import quantize_state, state_delta
from security import Peer


def make_federation(**overrides) -> server.Federation:
    args = SimpleNamespace(min_clients=2, min_fit=1, round_timeout=5.0, rounds=3, lr=1e-3, lr_schedule="cosine",
                           local_epochs=1, batch_size=64, no_augment=False, hflip=False, quantize_broadcast=False)
    vars(args).update(overrides)
    return server.Federation(args, (torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)))


def session(cid: int, samples: int) -> server.Session:
    return server.Session(Peer(cid, samples, {}), conn=None, address=f"test:{cid}")


def perturbed(state, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7
            for k, v in state.items()}


def start_round(fed, sessions):
    base = fed.global_state
    rnd = server.RoundState(1, {s.client_id: s for s in sessions}, FedAvg(base))
    fed.round = rnd
    for s in sessions:
        fed.sessions[s.client_id] = s
    return rnd, server.RoundTask(1, b"", base, deadline=1e18)


def test_mixed_quantized_flat_and_state_dict_round_is_fedavg():
    fed = make_federation()
    a, b, c = session(0, 100), session(1, 300), session(2, 50)
    rnd, task = start_round(fed, [a, b, c])
    local_a, local_b, local_c = (perturbed(task.base, 0.01, i) for i in (1, 2, 5))
    q = quantize_state(state_delta(local_b, task.base))
    fed.submit(a, task, {"round": 1, "num_samples": 100, "metrics": {}, "quantized": False, "state": local_a}, 10, 10)
    fed.submit(b, task, {"round": 1, "num_samples": 300, "metrics": {"train_s": 2.0}, "quantized": True,
                         "delta": q}, 5, 10)
    fed.submit(c, task, {"round": 1, "num_samples": 50, "metrics": {}, "quantized": False,
                         "flat": Layout.of(local_c).pack(local_c)}, 10, 10)
    assert rnd.reported == {0, 1, 2} and rnd.accumulator.count == 3
    assert rnd.bytes_up == 25 and rnd.bytes_down == 30
    got, exact = rnd.accumulator.result(), fedavg([(local_a, 100), (local_b, 300), (local_c, 50)])
    for k, v in exact.items():
        if v.is_floating_point():
            step = (q[k]["scale"].max() if isinstance(q[k], dict) else 0)
            assert torch.allclose(got[k], v, atol=float(step) * 0.7 + 1e-6), k  # 2/3 weight x half a step
        else:
            assert torch.equal(got[k], v)
    assert sorted(c["quantized"] for c in rnd.clients) == [False, False, True]


def test_flat_update_folds_exactly_like_its_state_dict():
    results = []
    for form in ("state", "flat"):
        torch.manual_seed(0)  # the same initial global model
        fed = make_federation()
        a, b = session(0, 100), session(1, 300)
        rnd, task = start_round(fed, [a, b])
        for s, seed in ((a, 1), (b, 2)):
            local = perturbed(task.base, 0.01, seed)
            update = local if form == "state" else Layout.of(local).pack(local)
            fed.submit(s, task, {"round": 1, "num_samples": s.peer.num_samples, "metrics": {}, "quantized": False,
                                 form: update}, 1, 1)
        assert rnd.accumulator.count == 2
        results.append(rnd.accumulator.result())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


@pytest.mark.parametrize("bad", [
    {"state": None},
    {"num_samples": 10**9},
    {"num_samples": 0},
    {"round": 2},
    {"state_nan": True},
    {"state_shape": True},
    {"flat": "nan"},
    {"flat": "other model"},
    {"flat": "short"},
    {"flat": "not a dict"},
])
def test_bad_update_is_excluded_and_reported(bad):
    fed = make_federation()
    good, evil = session(0, 100), session(1, 100)
    rnd, task = start_round(fed, [good, evil])
    state = perturbed(task.base, 0.01, 3)
    if bad.pop("state_nan", False):
        state["classifier.1.weight"] = state["classifier.1.weight"].clone().fill_(float("nan"))
    if bad.pop("state_shape", False):
        state["classifier.1.weight"] = torch.zeros(3, 3)
    body = {"round": 1, "num_samples": 100, "metrics": {}, "quantized": False, "state": state, **bad}
    if "flat" in bad:
        packed = Layout.of(state).pack(state)
        if bad["flat"] == "nan":
            packed["float"][12345] = float("nan")
        elif bad["flat"] == "other model":
            packed["layout"] += 1
        elif bad["flat"] == "short":
            packed["float"] = packed["float"][:-1]
        else:
            packed = [packed["float"], packed["int"]]
        body = {k: v for k, v in body.items() if k != "state"} | {"flat": packed}
    fed.submit(evil, task, body, 1, 1)
    assert 1 in rnd.reported and rnd.accumulator.count == 0
    fresh = perturbed(task.base, 0.01, 3)
    fed.submit(good, task, {"round": 1, "num_samples": 100, "metrics": {}, "quantized": False, "state": fresh}, 1, 1)
    assert rnd.accumulator.count == 1


def test_ingest_thread_decodes_and_folds_and_survives_garbage():
    fed = make_federation()
    a, b = session(0, 100), session(1, 300)
    rnd, task = start_round(fed, [a, b])
    with pytest.raises(ProtocolError, match="undecodable"):
        fed.ingest.process(a, task, bytearray(b"PK\x03\x04 not a zip"), 1, 1)
    assert rnd.accumulator.count == 0
    local = perturbed(task.base, 0.01, 6)
    payload = encode_payload(update_message(local, task.base, 1, 300, {"train_s": 1.5}))
    fed.ingest.process(b, task, memoryview(bytearray(payload)), len(payload), 7)  # the thread is still there
    assert rnd.accumulator.count == 1 and 1 in rnd.reported and rnd.bytes_up == len(payload)
    got = rnd.accumulator.result()
    for k, v in local.items():
        assert torch.equal(got[k], v), k


def test_ingest_lends_at_most_its_slots_of_buffers():
    fed = make_federation()
    held = [fed.ingest.buffer(timeout=0.01) for _ in range(server.INGEST_SLOTS)]
    assert all(isinstance(buf, bytearray) for buf in held) and len({id(buf) for buf in held}) == len(held)
    assert len(held[0]) > 4 * sum(v.numel() for v in fed.global_state.values())  # a float update fits
    assert fed.ingest.buffer(timeout=0.01) is None  # the caller then reads into its own memory
    fed.ingest.give_back(held.pop())
    assert fed.ingest.buffer(timeout=0.01) is not None


def test_quantized_broadcast_tracks_the_clients_view():
    fed = make_federation(quantize_broadcast=True)
    first, packed = fed.broadcast_state()
    assert packed is None and first is fed.global_state  # round 1: the full model
    fed.global_state = perturbed(first, 0.01, 4)
    view, packed = fed.broadcast_state()
    assert packed is not None and fed.view is view and fed.view_id == 2
    for k, v in fed.global_state.items():  # the view is the global model up to half a step
        if v.is_floating_point():
            assert torch.allclose(view[k], v, atol=float(packed[k]["scale"].max()) / 2 + 1e-6)
        else:
            assert torch.equal(view[k], v)


def test_register_replaces_duplicate_client_id():
    fed = make_federation()
    closed = threading.Event()
    old = session(0, 10)
    old.conn = SimpleNamespace(close=closed.set)
    fed.register(old)
    new = session(0, 10)
    fed.register(new)
    assert fed.sessions[0] is new and closed.is_set()
    assert old.tasks.get_nowait() == server.Stop("replaced by a newer connection")


def test_model_has_the_specified_size():
    assert sum(p.numel() for p in ImprovedCNN().parameters()) == 421_834
