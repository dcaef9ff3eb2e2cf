"""End to end, secure aggregation with real processes on 127.0.0.1: server.py with
--secure-aggregation, clients hosted by worker.py and by tests/secagg_helper.py (worker.py
with test hooks that record what each client encoded and sent, or make it drop out).

What each test shows: the aggregate the server applies is exactly the decoded sum of the
clients' fixed-point updates, and what it received from any one client is not that
client's update; clients killed after sending their masked input still count and the
round completes; below the threshold the round is retried and nothing of it is used, with
the same sample and fresh training randomness; a client that does not support secure
aggregation is refused with one clear line. And what one participant can do (issue 21): a
small-order public key, a skipped clip, a wrong unmasking share are each caught, the server
keeps running, and nothing beyond the bound is ever committed.
"""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import attacks
import pytest
import torch
from procs import Worker, expect_exit, log_of, server_args, start, stop, wait_for_line

from fl.common.layout import Layout
from fl.secagg import FixedPoint
from fl.server import checkpoint as ckpt
from fl.server.secagg import REFUSAL
from fl.wire.errors import RemoteError
from fl.wire.frames import Connection, MsgType
from fl.wire.handshake import client_handshake

LIMIT = 20  # samples per client: training takes milliseconds
MASK32 = (1 << 32) - 1


def metrics(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines() if line.strip()]


def start_server(tmp: Path, port: int, data: Path, rounds: int, clients: int, *extra: object):
    log = tmp / "server.log"
    proc = start("server.py", *server_args(port, tmp, data, rounds, clients, "--secure-aggregation", "--test-limit", 100,
                                           "--round-timeout", 60, "--secagg-stage-timeout", 20, *extra), log=log)
    wait_for_line(log, "listening on", timeout=60, proc=proc)
    return proc, log


def start_worker(tmp: Path, port: int, ids: str, num: int, data: Path, *extra: object, name: str = "worker",
                 helper: bool = True, **env: str):
    log = tmp / f"{name}.log"
    args = ["--port", port, "--client-ids", ids, "--num-clients", num, "--data-dir", data, "--no-progress",
            "--no-download", "--limit", LIMIT, *extra]
    return start("tests/secagg_helper.py" if helper else "worker.py", *args, log=log, **env), log


def run_with_fault(tmp: Path, port: int, data: Path, rounds: int, clients: int, steady: str, faulty: str,
                   fault: str, *server_extra: object, record_faulty: bool = True,
                   wait_faulty: bool = True) -> tuple[str, Path, Path, Path]:
    """A secure-aggregation run to its end: honest clients ``steady`` and clients ``faulty``
    with ``secagg_helper``'s ``fault``; both record what they send in ``rec`` (the faulty
    ones unless ``record_faulty`` is False). Returns the server's log text, the two worker
    logs and ``rec``."""
    rec = tmp / "rec"
    rec.mkdir()
    server, slog = start_server(tmp, port, data, rounds, clients, *server_extra)
    honest, wlog = start_worker(tmp, port, steady, clients, data, FL_TEST_SECAGG_RECORD=str(rec))
    recording = {"FL_TEST_SECAGG_RECORD": str(rec)} if record_faulty else {}
    odd, flog = start_worker(tmp, port, faulty, clients, data, name="faulty", FL_TEST_SECAGG_FAULT=fault, **recording)
    try:
        expect_exit(server, slog)
        expect_exit(honest, wlog)
        if wait_faulty:
            expect_exit(odd, flog)
    finally:
        stop(server, honest, odd)
    return log_of(slog), wlog, flog, rec


def records(folder: Path, ids) -> dict[int, dict]:
    return {u: torch.load(folder / f"client{u}.pt", weights_only=True) for u in ids}


def expected_model(recs: dict[int, dict], state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the server must commit: the model the clients trained from plus the decoded ring
    sum of their encoded deltas over their count (FedAvg's server step), variances clamped
    at 0; the integer counters' mean, rounded."""
    first = next(iter(recs.values()))
    assert all(torch.equal(r["base"], first["base"]) and r["round"] == first["round"] for r in recs.values())
    fp = FixedPoint(first["bits"], 8.0, first["max_clients"])
    assert fp.frac_bits == first["frac_bits"]
    total = torch.zeros_like(first["x"])
    for r in recs.values():
        total = (total + r["x"]) & MASK32
    floats = (first["base"].double() + fp.decode(total, len(recs)) / len(recs)).float()
    layout = Layout.of(state)
    for e in layout.entries:
        if e.name.endswith("running_var"):
            floats[e.offset:e.offset + e.numel].clamp_(min=0)
    ints = (torch.tensor([r["ints"] for r in recs.values()], dtype=torch.float64).mean(0)).round().to(torch.int64)
    return floats, ints


def committed(tmp: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    state = ckpt.load(tmp / "ckpt.pt")["model"]
    floats, ints = Layout.of(state).flatten(state)
    return floats, ints, state


def test_aggregate_is_exactly_the_fixed_point_sum_and_no_single_update_is_seen(tmp_path, synthetic_mnist_dir,
                                                                               free_port):
    """(a) the unmasked aggregate equals the plain aggregate of the same fixed-point updates,
    bit for bit; (b) a client's masked input, as the server received it, is not its update.
    The clients ask for 8-bit updates, which secure aggregation cannot mask: they say so and
    send 32-bit masked vectors."""
    rec = tmp_path / "rec"
    rec.mkdir()
    server, slog = start_server(tmp_path, free_port, synthetic_mnist_dir, 2, 4)
    worker, wlog = start_worker(tmp_path, free_port, "0-3", 4, synthetic_mnist_dir, "--quantization",
                                FL_TEST_SECAGG_RECORD=str(rec))
    try:
        expect_exit(server, slog)
        expect_exit(worker, wlog)
    finally:
        stop(server, worker)
    m = metrics(tmp_path)
    assert [r["round"] for r in m] == [1, 2] and all(r["clients"] == 4 and r["quantized"] == 0 for r in m)
    assert all(c["norm"] is None for r in m for c in r["per_client"])  # the server never saw one update
    recs = records(rec, range(4))
    assert {r["round"] for r in recs.values()} == {2}
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(recs, state)
    assert torch.equal(floats, want_floats)  # (a): exact
    assert torch.equal(ints, want_ints)
    fp = FixedPoint(32, 8.0, 4)
    for u, r in recs.items():  # (b)
        x, y = r["x"], r["y"]
        update, seen = fp.decode(x, 1), fp.decode(y, 1)
        assert (x == y).double().mean() < 0.01, u
        assert seen.abs().mean() > 1000 * update.abs().mean(), u  # uniform noise over the ring, not an update
        assert abs(torch.corrcoef(torch.stack([update, seen]))[0, 1].item()) < 0.02, u
    masked_sum = torch.zeros_like(x)
    for r in recs.values():
        masked_sum = (masked_sum + r["y"]) & MASK32
    assert (masked_sum == sum(r["x"] for r in recs.values()) & MASK32).double().mean() < 0.01  # self masks remain
    wtext, stext = log_of(wlog), log_of(slog)
    assert wtext.count("8-bit --quantization cannot be masked") == 4  # once per client
    assert "secure sum of 4 masked updates" in stext and "norm screening and server-side clipping are off" in stext


@pytest.mark.parametrize("fault, killed, counted", [
    ("exit-after-masked", 1, 5),  # killed after the masked input: still in the sum
    ("exit-after-masked", 2, 5),
    ("drop-before-masked", 1, 4),  # gone before it: its pairwise masks are removed, it is not counted
])
def test_clients_killed_mid_round(tmp_path, synthetic_mnist_dir, free_port, fault, killed, counted):
    """(c) one or two clients die after sending their masked input (their process exits
    before the unmasking): the round completes and equals the sum of every client whose
    masked input arrived; a client that hangs up before its masked input is left out."""
    stay, faulty = f"0-{4 - killed}", f"{5 - killed}-4"
    stext, _, _, rec = run_with_fault(tmp_path, free_port, synthetic_mnist_dir, 1, 5, stay, faulty, fault,
                                      "--secagg-threshold", 3)
    assert f"secure sum of {counted} masked updates (threshold 3)" in stext, stext[-3000:]
    if fault == "exit-after-masked":
        assert f"{killed} dropped after it, still counted" in stext
    else:
        assert "1 dropped before their masked input, their masks removed" in stext
    m = metrics(tmp_path)
    assert len(m) == 1 and m[0]["clients"] == counted
    recs = records(rec, [u for u in range(5) if (rec / f"client{u}.pt").exists()])
    assert len(recs) == counted
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(recs, state)
    assert torch.equal(floats, want_floats) and torch.equal(ints, want_ints)


def test_below_threshold_the_round_is_retried_and_nothing_is_used(tmp_path, synthetic_mnist_dir, free_port):
    """(d) two of four clients hang up before their masked input with threshold 3: the
    attempt aborts before anyone reveals a share, the model is kept, the round is retried
    (the two reconnect) and the retry's sum is committed, as if the first never happened."""
    stext, wlog, flog, rec = run_with_fault(tmp_path, free_port, synthetic_mnist_dir, 1, 4, "0-1", "2-3",
                                            "drop-before-masked", "--secagg-threshold", 3)
    assert stext.count("secure aggregation failed") == 1, stext[-3000:]
    assert "2 clients sent masked inputs, 3 needed" in stext and "retrying the round" in stext
    assert "round 1, attempt 2: the same sample as the last attempt, 4 of its 4 clients (0 gone" in stext
    for u in (0, 1):  # sent a masked input in both attempts: from the same model, trained afresh
        first, retry = (torch.load(rec / f"client{u}-r1-a{a}.pt", weights_only=True) for a in (0, 1))
        assert (first["attempt"], retry["attempt"]) == (0, 1) and torch.equal(first["base"], retry["base"])
        fp = FixedPoint(32, 8.0, first["max_clients"])
        update, change = fp.decode(first["x"], 1), fp.decode((retry["x"] - first["x"]) & MASK32, 1)
        assert (first["x"] != retry["x"]).double().mean() > 0.25, u  # one Adam step: +-lr, signs redrawn
        assert change.norm() > 0.5 * update.norm(), u  # two attempts' sums never differ by one update
    assert log_of(wlog).count("ended this client's part in the round: round aborted") == 2
    assert log_of(flog).count("test: hanging up") == 2 and "reconnecting" in log_of(flog)
    m = metrics(tmp_path)
    assert len(m) == 1 and m[0]["round"] == 1 and m[0]["clients"] == 4
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(records(rec, range(4)), state)
    assert torch.equal(floats, want_floats) and torch.equal(ints, want_ints)


@pytest.mark.parametrize("options", [{"quantization": False}, {"quantization": False, "secagg": False}])
def test_a_client_without_secure_aggregation_is_refused(tmp_path, synthetic_mnist_dir, free_port, options):
    """(e) an old client (no 'secagg' option) or one that says it cannot: one clear line."""
    server, slog = start_server(tmp_path, free_port, synthetic_mnist_dir, 1, 2)
    try:
        conn = Connection(socket.create_connection(("127.0.0.1", free_port), timeout=10))
        client_handshake(conn, 7, 100, options, None, timeout=10)
        with pytest.raises(RemoteError) as exc:
            conn.recv(MsgType.MODEL, timeout=10)
        conn.close()
        assert str(exc.value) == REFUSAL and "\n" not in REFUSAL
        wait_for_line(slog, "refused client 7 from 127.0.0.1", timeout=10)
        assert "does not support secure aggregation" in log_of(slog)
    finally:
        stop(server)


# --- issue 21: what one participant can do ---------------------------------------------------------

def test_a_small_order_key_is_refused_and_the_rounds_complete_without_it(tmp_path, synthetic_mnist_dir, free_port):
    """An attacker (127.0.0.2, the real protocol) answers every MODEL with the all-zero
    X25519 key. The old server took it: every honest neighbour failed key agreement and left,
    and no round completed (or server.py died with 'key agreement failed'). Now it is
    refused at stage 0 in one line, excluded for the run, and both rounds complete with the
    two honest clients; server and clients exit 0."""
    server, slog = start_server(tmp_path, free_port, synthetic_mnist_dir, 2, 3)
    done = threading.Event()
    attacker = Worker(attacks.small_order_participant, free_port, 9, None, done)
    honest, wlog = start_worker(tmp_path, free_port, "0-1", 3, synthetic_mnist_dir, helper=False)
    try:
        expect_exit(server, slog)
        expect_exit(honest, wlog)
    finally:
        done.set()
        stop(server, honest)
    seen = attacker.get(timeout=40)
    stext = log_of(slog)
    assert stext.count("client 9 is excluded for the rest of the run") == 1, stext[-3000:]
    assert "client 9 advertised a public key of small order" in stext
    assert "secure aggregation failed" not in stext and "Traceback" not in stext
    assert [(r["round"], r["clients"]) for r in metrics(tmp_path)] == [(1, 2), (2, 2)]
    assert any(line.startswith("refused:") and "small order" in line for line in seen), seen
    assert sum(line.startswith("sent a small-order key") for line in seen) == 1, seen  # never sampled again


def test_a_participant_that_skips_its_clip_never_moves_the_model_beyond_the_bound(tmp_path, synthetic_mnist_dir,
                                                                                 free_port):
    """Client 2 skips its clip in its first masked input (its encoded delta x 1000, in ring
    arithmetic). The old server folded that sum and committed it; now the sum is refused
    (beyond 3 x --clip-norm 1, or beyond 3 x --secagg-clip in some coordinate), the round is
    retried with the same sample and fresh training, and the committed model is the honest
    retry's: within --clip-norm of the model the clients trained from."""
    stext, _, clog, rec = run_with_fault(tmp_path, free_port, synthetic_mnist_dir, 1, 3, "0-1", "2", "boost-once",
                                         "--clip-norm", 1)
    assert stext.count("refused the secure sum of 3 updates") == 1, stext[-3000:]
    assert "round 1, attempt 2: the same sample as the last attempt, 3 of its 3 clients" in stext
    assert log_of(clog).count("test: skipping the clip") == 1
    boosted = torch.load(rec / "client2-r1-a0.pt", weights_only=True)
    fp = FixedPoint(32, 8.0, boosted["max_clients"])
    assert fp.decode(boosted["x"], 1).norm() > 100  # what it sent: far beyond the bound
    recs = records(rec, range(3))
    assert {r["attempt"] for r in recs.values()} == {1}
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(recs, state)
    assert torch.equal(floats, want_floats) and torch.equal(ints, want_ints)
    assert float((floats.double() - boosted["base"].double()).norm()) <= 1.0


def test_a_share_cheater_is_named_and_excluded_and_the_round_completes(tmp_path, synthetic_mnist_dir, free_port):
    """Client 0 reveals a wrong share of client 1's self-mask seed in every unmasking answer
    (its share is among the first t the server combines). The old server aborted every
    attempt it was in, unattributed, after it held the honest shares. Now its answer is
    refused by id (the share is not the one client 1 committed to), the secrets are rebuilt
    from the honest shares and round 1 completes with all four inputs; client 0 is never
    sampled again, and round 2 runs with the three others."""
    stext, _, _, rec = run_with_fault(tmp_path, free_port, synthetic_mnist_dir, 2, 4, "1-3", "0", "bad-shares",
                                      "--round-timeout", 20, wait_faulty=False)
    assert stext.count("client 0 is excluded for the rest of the run") == 1, stext[-3000:]
    assert "client 0 revealed a share of client 1's self-mask seed that is not the one dealt to it" in stext
    assert "secure aggregation failed" not in stext
    assert "round 1: secure sum of 4 masked updates" in stext and "round 2: secure sum of 3 masked updates" in stext
    assert [(r["round"], r["clients"]) for r in metrics(tmp_path)] == [(1, 4), (2, 3)]
    assert torch.load(rec / "client0.pt", weights_only=True)["round"] == 1
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(records(rec, range(1, 4)), state)
    assert torch.equal(floats, want_floats) and torch.equal(ints, want_ints)


def test_a_dealer_of_garbage_shares_is_left_out_and_the_round_completes(tmp_path, synthetic_mnist_dir, free_port):
    """Client 0 seals zeros instead of its shares. The old clients left the round on a share
    they could not open, so every attempt with client 0 aborted and the round never ended.
    Now they go on without its shares; its self-mask seed cannot be rebuilt, the attempt
    aborts naming it a suspect, and the retry (the same sample less client 0, trained
    afresh) commits the sum of the three others."""
    stext, wlog, _, rec = run_with_fault(tmp_path, free_port, synthetic_mnist_dir, 1, 4, "1-3", "0", "garbage-shares",
                                         record_faulty=False)
    assert stext.count("secure aggregation failed") == 1, stext[-3000:]
    assert "3 holder(s) could not open the shares it dealt" in stext
    assert "client(s) 0 left out of this round's next attempts" in stext
    assert "round 1, attempt 2: the same sample as the last attempt, 3 of its 4 clients" in stext
    assert log_of(wlog).count("could not open the shares client(s) 0 dealt") == 3
    assert [(r["round"], r["clients"]) for r in metrics(tmp_path)] == [(1, 3)]
    recs = records(rec, range(1, 4))
    assert {r["attempt"] for r in recs.values()} == {1}
    floats, ints, state = committed(tmp_path)
    want_floats, want_ints = expected_model(recs, state)
    assert torch.equal(floats, want_floats) and torch.equal(ints, want_ints)
