"""Secure aggregation in the server, without sockets: the stage coordinator
(secagg_round.py) driven by one thread per client, the SECAGG wire form (secagg_wire.py),
the round settings and threshold rule, the fold into the strategies' aggregators and the
command line (secagg_server.py)."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import server
from fl import strategies
from fl.privacy.fixed_clipping import DPMeanAggregator
from fl.secagg import FixedPoint, SecAggClient, SecAggConfig, SecAggError
from fl.secagg.coordinator import Left, RoundClosed, SecAggRound
from fl.secagg.graph import neighbours
from fl.secagg.wire import (
    ABORT,
    CLIENT_FIELDS,
    SERVER_FIELDS,
    Settings,
    abort,
    decode,
    decode_client,
    decode_server,
    default_threshold,
    encode,
    group_size,
)
from fl.server.config import ServerConfig
from fl.server.federation import Session
from fl.server.secagg import SecAggFederation, round_settings
from fl.strategies.base import MeanAggregator
from fl.wire.frames import decode_payload, encode_payload
from fl.wire.handshake import Peer

MASK32 = (1 << 32) - 1
SEED = bytes(range(32))


def inputs(ids, length: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {u: torch.randint(0, 1 << 32, (length,), generator=g) for u in ids}


def ring_sum(xs: dict[int, torch.Tensor], ids) -> torch.Tensor:
    total = torch.zeros_like(next(iter(xs.values())))
    for u in ids:
        total = (total + xs[u]) & MASK32
    return total


class Clients:
    """One thread per client, each playing a handler and its client against the coordinator.
    ``drop[u] = stage``: u's connection dies before it sends that stage's message;
    ``silent[u] = stage``: u just stops answering there (only the deadline releases it)."""

    def __init__(self, coord: SecAggRound, xs: dict[int, torch.Tensor], drop=None, silent=None, config=None,
                 metadata=lambda u: {"client": u}):
        self.coord, self.xs, self.metadata = coord, xs, metadata
        self.drop, self.silent = drop or {}, silent or {}
        self.outcome: dict[int, Any] = {}
        self.masked: dict[int, torch.Tensor] = {}
        cfg = config or coord.config
        self.threads = [threading.Thread(target=self._run, args=(u, SecAggClient(u, cfg, coord.round)), daemon=True)
                        for u in xs]
        for t in self.threads:
            t.start()

    def _run(self, u: int, client: SecAggClient) -> None:
        coord, reply = self.coord, None
        for stage in range(4):
            if self.drop.get(u) == stage:
                coord.drop(u, "connection lost")
                self.outcome[u] = f"dropped at {stage}"
                return
            if self.silent.get(u) == stage:
                self.outcome[u] = f"silent at {stage}"
                return
            if stage == 0:
                msg = client.advertise_keys()
            elif stage == 1:
                msg = client.share_keys(reply)
            elif stage == 2:
                msg = client.masked_input(reply, self.xs[u])
                self.masked[u] = msg["masked"].to(torch.int64)
            else:
                msg = client.unmask(reply)
            coord.submit(u, stage, msg, self.metadata(u) if stage == 2 else None)
            if stage == 3:
                self.outcome[u] = "done"
                return
            reply = coord.wait(u, stage)
            if isinstance(reply, Left):
                self.outcome[u] = reply
                return

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive()


def coordinator(ids, length=300, threshold=3, stage_timeout=30.0, round_timeout=60.0, **kw) -> SecAggRound:
    now = time.monotonic()
    return SecAggRound(SecAggConfig(length=length, threshold=threshold, num_shares=kw.pop("num_shares", None)), 7,
                       ids, start=now, round_deadline=now + round_timeout, stage_timeout=stage_timeout, **kw)


def test_full_round_sums_exactly_and_sees_only_masked_inputs():
    ids = [3, 5, 8, 13, 21]
    coord, xs = coordinator(ids, length=300), inputs(ids, 300)
    clients = Clients(coord, xs)
    total = coord.run()
    clients.join()
    assert torch.equal(total, ring_sum(xs, ids))
    assert coord.server.survivors == tuple(ids) and set(clients.outcome.values()) == {"done"}
    assert coord.metadata == {u: {"client": u} for u in ids}
    for u in ids:  # what the server got from u is not u's input
        assert (clients.masked[u] == xs[u]).float().mean() < 0.02


@pytest.mark.parametrize("stage, survivors", [(0, (0, 1, 2, 3)), (1, (0, 1, 2, 3)), (2, (0, 1, 2, 3)),
                                              (3, (0, 1, 2, 3, 4))])
def test_a_lost_connection_releases_the_barrier_at_once(stage, survivors):
    ids = list(range(5))
    coord, xs = coordinator(ids, length=200, stage_timeout=30.0), inputs(ids, 200)
    start = time.monotonic()
    clients = Clients(coord, xs, drop={4: stage})
    total = coord.run()
    clients.join()
    assert time.monotonic() - start < 10  # nobody waited for the 30 s deadline
    assert coord.server.survivors == survivors  # after its masked input, client 4 still counts
    assert torch.equal(total, ring_sum(xs, survivors))
    assert not coord.timed_out


def test_two_dropouts_after_masked_input_still_count():
    ids = list(range(5))
    coord, xs = coordinator(ids, length=200), inputs(ids, 200)
    clients = Clients(coord, xs, drop={1: 3, 3: 3})
    total = coord.run()
    clients.join()
    assert coord.server.survivors == tuple(ids) and coord.server.responders == (0, 2, 4)
    assert torch.equal(total, ring_sum(xs, ids))


def test_a_silent_client_is_dropped_at_the_stage_deadline():
    ids = list(range(4))
    coord, xs = coordinator(ids, length=100, stage_timeout=0.5), inputs(ids, 100)
    start = time.monotonic()
    clients = Clients(coord, xs, silent={2: 1})
    total = coord.run()
    clients.join()
    assert 0.4 < time.monotonic() - start < 10
    assert coord.timed_out == {2} and coord.server.survivors == (0, 1, 3)
    assert torch.equal(total, ring_sum(xs, (0, 1, 3)))
    with pytest.raises(RoundClosed):  # its late message is refused, nothing changes
        coord.submit(2, 1, {})


def test_masked_input_stage_runs_to_the_round_deadline():
    ids = list(range(4))
    coord, xs = coordinator(ids, length=100, stage_timeout=0.2, round_timeout=1.5), inputs(ids, 100)
    start = time.monotonic()
    clients = Clients(coord, xs, silent={0: 2})
    total = coord.run()
    clients.join()
    assert time.monotonic() - start > 1.0  # stage 2 waited for the round deadline, not 0.2 s
    assert coord.timed_out == {0} and torch.equal(total, ring_sum(xs, (1, 2, 3)))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_below_threshold_the_round_aborts_and_everyone_waiting_hears_it(stage):
    ids = list(range(4))
    coord, xs = coordinator(ids, length=100, threshold=3), inputs(ids, 100)
    clients = Clients(coord, xs, drop={0: stage, 1: stage})
    assert coord.run() is None
    clients.join()
    assert "needed" in coord.failure
    if stage < 3:  # clients waiting at the barrier are told; none of them unmasks anything
        assert all(isinstance(clients.outcome[u], Left) and "aborted" in clients.outcome[u].reason for u in (2, 3))
    with pytest.raises(RoundClosed, match="aborted"):
        coord.submit(2, 0, {})


def test_a_bad_message_is_refused_without_changing_anything():
    ids = [0, 1, 2]
    coord = coordinator(ids)
    c = SecAggClient(0, coord.config, coord.round)
    good = c.advertise_keys()
    with pytest.raises(SecAggError, match="32 bytes"):
        coord.submit(0, 0, {**good, "c_pk": b"short"})
    with pytest.raises(SecAggError, match="not sampled"):
        coord.submit(9, 0, SecAggClient(9, coord.config, coord.round).advertise_keys())
    with pytest.raises(RoundClosed, match="not open"):
        coord.submit(0, 1, {})
    coord.submit(0, 0, good)
    assert coord.answered[0] == {0}
    with pytest.raises(SecAggError, match="already advertised"):
        coord.submit(0, 0, good)


def test_stopping_the_server_ends_the_round():
    coord = coordinator([0, 1, 2])
    stop = threading.Event()
    stop.set()
    assert coord.run(stop) is None and "stopping" in coord.failure
    assert isinstance(coord.wait(0, 0), Left)


def test_secagg_plus_client_whose_group_is_gone_is_left_out():
    ids = list(range(9))
    links = neighbours(ids, SEED, 5)
    gone = set(links[0][:3])  # 3 of client 0's 4 neighbours drop before sharing keys
    coord, xs = coordinator(ids, length=100, num_shares=5, graph_seed=SEED), inputs(ids, 100)
    clients = Clients(coord, xs, drop={u: 1 for u in gone})
    total = coord.run()
    clients.join()
    assert isinstance(clients.outcome[0], Left) and "left out" in clients.outcome[0].reason
    assert 0 not in coord.server.survivors
    assert torch.equal(total, ring_sum(xs, coord.server.survivors))


# --- the wire ---------------------------------------------------------------------------------

def wire(body: dict) -> dict:
    return decode_payload(encode_payload(body))  # safe_decode's allowlist, as on a connection


def test_every_stage_survives_safe_decode_and_converts_back():
    ids = [0, 1, 2]
    cfg = SecAggConfig(length=50, threshold=2)
    coord = coordinator(ids, length=50, threshold=2)
    cs = {u: SecAggClient(u, cfg, coord.round) for u in ids}
    x = torch.randint(0, 1 << 32, (50,))
    for u, c in cs.items():
        msg, extra = decode_client(wire(encode(0, c.advertise_keys())), 0)
        assert extra == {} and isinstance(msg["c_pk"], bytes)
        coord.submit(u, 0, msg)
    keys = coord.server.broadcast_keys()
    keys_back = decode_server(wire(encode(0, keys)), 0)
    assert isinstance(keys_back["graph_seed"], bytes) and keys_back["graph_seed"] == keys["graph_seed"]
    shares = cs[0].share_keys(keys_back)
    back, _ = decode_client(wire(encode(1, shares)), 1)
    assert back["b_commit"] == shares["b_commit"] and torch.equal(back["ciphertexts"], shares["ciphertexts"])
    meta = {"num_samples": 5, "metrics": {"loss": 0.5}, "ints": [3]}
    body = wire(encode(2, {"round": 7, "masked": x.to(torch.uint32)}, **meta))
    assert body["masked"].dtype == torch.int32  # the uint32 ring travels as its int32 bits
    masked, extra = decode_client(body, 2)
    assert masked["masked"].dtype == torch.uint32 and torch.equal(masked["masked"].to(torch.int64), x)
    assert extra == meta
    assert decode_server(wire(abort(7, "round aborted: \x1b[31mtoo few")), 1).startswith("round aborted")


@pytest.mark.parametrize("body, match", [
    ({"stage": 1, "round": 7, "c_pk": b"", "s_pk": b""}, "for stage ShareKeys, expected AdvertiseKeys"),
    ({"stage": 0, "round": 7, "c_pk": b""}, "exactly the fields"),
    ({"stage": 0, "round": 7, "c_pk": b"", "s_pk": b"", "x": 1}, "exactly the fields"),
    ({"stage": "0", "round": 7}, "stage"),
    ({"stage": 9, "round": 7}, "stage"),
    ({"round": 7}, "stage"),
])
def test_wire_refuses_wrong_stages_and_fields(body, match):
    with pytest.raises(SecAggError, match=match):
        decode_client(body, 0)


def test_wire_field_tables_match_the_core():
    assert set(CLIENT_FIELDS) == {0, 1, 2, 3} and set(SERVER_FIELDS) == {0, 1, 2} and ABORT == 4
    with pytest.raises(SecAggError, match="exactly the fields"):  # no metadata on other stages
        decode(encode(3, {"round": 1}, num_samples=3), 3, CLIENT_FIELDS[3])


# --- settings and the threshold rule ------------------------------------------------------------

def test_threshold_rule():
    assert [default_threshold(g) for g in (2, 3, 4, 5, 10, 50)] == [2, 2, 3, 4, 7, 34]
    assert all(default_threshold(g) > g / 2 for g in range(2, 200))
    assert group_size(10, None) == 10 and group_size(10, 5) == 5 and group_size(4, 5) == 4


def test_settings_round_trip_and_refusals():
    s = Settings(round=3, threshold=3, min_clients=3, bits=32, clip=8.0, max_clients=5, num_shares=None,
                 length=1000, l2_clip=2.5, attempt=2)
    assert Settings.from_dict(wire({"s": s.to_dict()})["s"]) == s and s.to_dict()["attempt"] == 2
    assert s.fixed_point().frac_bits == FixedPoint(32, 8.0, 5).frac_bits
    from fl.wire.errors import ProtocolError
    for change, match in [({"version": 1}, "version"), ({"attempt": -1}, "attempt"), ({"threshold": 1}, "threshold"),
                          ({"clip": 8}, "float"),
                          ({"bits": 70}, "bits"), ({"extra": 1}, "exactly"), ({"num_shares": 4}, "num_shares")]:
        with pytest.raises(ProtocolError, match=match):
            Settings.from_dict({**s.to_dict(), **change})


def test_round_settings():
    cfg = ServerConfig(secure_aggregation=True, min_fit=2, clip_norm=1.5)
    s, _ = round_settings(cfg, 10, 422_026, 4)
    assert (s.threshold, s.min_clients, s.num_shares, s.max_clients, s.l2_clip) == (7, 7, None, 10, 1.5)
    s, _ = round_settings(ServerConfig(secagg_neighbours=5, min_fit=2), 50, 100, 1)
    assert (s.threshold, s.num_shares) == (4, 5)
    s, _ = round_settings(ServerConfig(secagg_neighbours=5, min_fit=2), 4, 100, 1)
    assert (s.threshold, s.num_shares) == (3, None)  # the group is everyone
    assert round_settings(cfg, 1, 100, 1)[0] is None
    none, why = round_settings(ServerConfig(secagg_threshold=4, min_fit=2), 3, 100, 1)
    assert none is None and "threshold 4 exceeds" in why


# --- folding the sum ----------------------------------------------------------------------------

def test_add_sum_gives_the_uniform_mean_and_the_dp_mean():
    total = torch.randn(100, dtype=torch.float64)
    mean = MeanAggregator(100)
    mean.add_sum(total, 4)
    assert torch.equal(mean.result(), total / 4)
    dp = DPMeanAggregator(100, clip_norm=1.0, sampled=5, noise_std=0.0, generator=torch.Generator(),
                          clip_at_server=False, norm_limit=1.0)
    dp.add_sum(total.clone(), 4)
    assert torch.allclose(dp.result(), total / 5)  # divided by the m sampled, as DP-FedAvg does
    with pytest.raises(ValueError, match="more updates"):
        DPMeanAggregator(100, clip_norm=1.0, sampled=3, noise_std=0.0, generator=torch.Generator(),
                         clip_at_server=False, norm_limit=1.0).add_sum(total, 4)
    with pytest.raises(TypeError, match="cannot take a secure sum"):
        strategies.make("median").aggregator(100).add_sum(total, 4)


def test_federation_round_folds_the_decoded_mean():
    """SecAggFederation without sockets: handler threads are played by Clients."""
    torch.manual_seed(0)
    cfg = ServerConfig(secure_aggregation=True, min_clients=4, min_fit=2, round_timeout=30, norm_ratio=4.0,
                       weighting="uniform")
    fed = SecAggFederation(cfg, strategies.make("fedavg"))
    assert fed.norm_ratio is None and fed.clip_norm is None
    sessions = {u: Session(Peer(u, 100, {"secagg": True}), f"test:{u}") for u in range(4)}
    fed.sessions.update(sessions)
    rnd, task = fed.open_round(1, 0, dict(sessions))
    settings = fed.settings
    assert settings.threshold == 3 and task.secagg is fed.coordinator
    fp = settings.fixed_point()
    g = torch.Generator().manual_seed(1)
    deltas = {u: torch.randn(fed.layout.float_numel, generator=g) * 0.01 for u in range(4)}
    xs = {u: fp.encode(d) for u, d in deltas.items()}
    def metadata(u):  # what the handler checks before it hands the masked input over
        return fed.check_metadata(sessions[u], {"num_samples": 100, "metrics": {"loss": 1.0},
                                                "ints": [5] * fed.layout.int_numel})

    clients = Clients(task.secagg, xs, drop={3: 3}, config=settings.config(), metadata=metadata)
    fed.collect(rnd, task.deadline)
    clients.join()
    state = fed.finish_round(rnd)
    assert state is not None and len(rnd.clients) == 4
    expected = (task.base_floats.double() + fp.decode(ring_sum(xs, range(4)), 4) / 4).float()
    for e in fed._variances:
        expected[e.offset:e.offset + e.numel].clamp_(min=0)
    floats, ints = fed.layout.flatten(state)
    assert torch.equal(floats, expected)
    assert ints.tolist() == [5] * fed.layout.int_numel
    assert {c["client_id"] for c in rnd.clients} == {0, 1, 2, 3} and rnd.clients[0]["norm"] is None
    with pytest.raises(SecAggError, match="ints"):
        fed.check_metadata(sessions[0], {"num_samples": 100, "metrics": {}, "ints": [1.5]})
    with pytest.raises(SecAggError, match="sample count"):
        fed.check_metadata(sessions[0], {"num_samples": 101, "metrics": {}, "ints": [1] * fed.layout.int_numel})


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--strategy", "median"], "--strategy median needs every client's update"),
    (["--strategy", "trimmed-mean"], "--strategy trimmed-mean needs every client's update"),
    (["--dp-noise-multiplier", "1", "--clip-norm", "1"], "server-side DP clipping"),
    (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--dp-adaptive", "--dp-clipping", "client"],
     "server-side DP clipping"),
    (["--weighting", "samples"], "the mean is uniform"),
    (["--min-clients", "1"], "--min-clients >= 2"),
    (["--min-clients", "3", "--secagg-threshold", "4"], "exceeds the 3 clients"),
    (["--secagg-neighbours", "4"], "odd group size"),
    (["--secagg-threshold", "1"], "at least 2"),
    (["--secagg-bits", "4"], "8..62"),
    (["--secagg-bits", "8", "--secagg-clip", "1000"], "cannot hold"),
])
def test_cli_refuses_what_needs_individual_updates(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        server.parse_args(["--secure-aggregation", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()[-1]) < 300


def test_cli_defaults_and_flags_without_secure_aggregation(capsys):
    cfg, _ = server.parse_args(["--secure-aggregation", "--min-clients", "5", "--secagg-neighbours", "3",
                                "--dp-noise-multiplier", "0.5", "--clip-norm", "2", "--dp-clipping", "client"])
    assert cfg.secure_aggregation and cfg.weighting == "uniform" and cfg.min_fit == 2
    assert cfg.secagg_neighbours == 3 and cfg.secagg_threshold is None and cfg.secagg_bits == 32
    plain, _ = server.parse_args([])
    assert not plain.secure_aggregation and plain.min_fit == 1 and plain.weighting == "samples"
    with pytest.raises(SystemExit):
        server.parse_args(["--secagg-threshold", "3"])
    assert "needs --secure-aggregation" in capsys.readouterr().err


# --- what a participant can do -------------------------------------------------------------------

@pytest.mark.parametrize("error", [SecAggError("key agreement failed: Error computing shared key."),
                                   ValueError("shares must all be the same size")])
def test_no_error_of_the_core_leaves_the_coordinator(monkeypatch, error):
    """The old coordinator caught only SecAggAbort: a SecAggError from finish() (rebuilding
    a dropped client's key against a small-order key) ended server.py with a traceback."""
    ids = [0, 1, 2]
    coord, xs = coordinator(ids, length=50), inputs(ids, 50)

    def finish():
        raise error
    monkeypatch.setattr(coord.server, "finish", finish)
    clients = Clients(coord, xs)
    assert coord.run() is None
    clients.join()
    assert coord.failure == f"round 7: {error}"


def test_a_cheat_is_recorded_and_an_abort_names_its_culprits():
    ids = [0, 1, 2]
    coord = coordinator(ids)
    with pytest.raises(SecAggError, match="small order"):
        coord.submit(1, 0, {**SecAggClient(1, coord.config, coord.round).advertise_keys(), "s_pk": bytes(32)})
    assert set(coord.cheaters) == {1} and "small order" in coord.cheaters[1]
    from fl.secagg import SecAggAbort
    coord._fail(SecAggAbort("round 7: client 2's verified shares do not rebuild ...", (2,)))
    assert set(coord.cheaters) == {1, 2}


def federation(clip_norm=None, n=4, **kw):
    cfg = ServerConfig(secure_aggregation=True, min_clients=n, min_fit=2, round_timeout=30, weighting="uniform",
                       clip_norm=clip_norm, **kw)
    fed = SecAggFederation(cfg, strategies.make("fedavg"))
    sessions = {u: Session(Peer(u, 100, {"secagg": True}), f"test:{u}") for u in range(n)}
    fed.sessions.update(sessions)
    return fed, sessions


def run_round(fed, sessions, xs, attempt=0, **kw):
    rnd, task = fed.open_round(1, attempt, dict(sessions))
    def metadata(u):
        return fed.check_metadata(sessions[u], {"num_samples": 100, "metrics": {"loss": 1.0},
                                                "ints": [5] * fed.layout.int_numel})
    clients = Clients(task.secagg, {u: xs[u] for u in rnd.participants}, config=fed.settings.config(),
                      metadata=metadata, **kw)
    fed.collect(rnd, task.deadline)
    clients.join()
    return rnd, task, fed.finish_round(rnd)


@pytest.mark.parametrize("case", ["unclipped-coordinates", "unclipped-norm", "wrapped"])
def test_an_out_of_bounds_sum_is_refused_and_nothing_is_committed(case, caplog):
    """One of four clients skips its clip: coordinates far beyond --secagg-clip (its own ring
    elements), or within it but with an L2 norm far beyond --clip-norm, or a ring element
    that wraps the sum around. The old server committed such sums (max |coordinate| 10.7,
    L2 6,929 with --clip-norm 1); here the attempt is refused in one line."""
    fed, sessions = federation(clip_norm=1.0)
    fp = round_settings(fed.config, 4, fed.layout.float_numel, 1)[0].fixed_point()
    g = torch.Generator().manual_seed(1)
    deltas = {u: torch.randn(fed.layout.float_numel, generator=g) * 1e-4 for u in range(4)}
    xs = {u: fp.encode(d) for u, d in deltas.items()}
    big = {"unclipped-coordinates": 2**fp.frac_bits * 40.0, "unclipped-norm": 2**fp.frac_bits * 0.5,
           "wrapped": 2.0**31}[case]
    xs[3] = (torch.full_like(xs[3], int(big)) * (1 - 2 * (torch.arange(xs[3].numel()) % 2))) & MASK32
    with caplog.at_level("ERROR", logger="server"):
        rnd, _, state = run_round(fed, sessions, xs)
    assert state is None and rnd.clients == []
    lines = [r.getMessage() for r in caplog.records if "refused the secure sum" in r.getMessage()]
    assert len(lines) == 1 and "unclipped or malformed input" in lines[0]
    assert ("L2 norm" in lines[0]) == (case == "unclipped-norm")


def test_an_honest_sum_at_the_bounds_is_committed():
    """Four clients at exactly --clip-norm (after the rounding margin), coordinates near
    --secagg-clip: within both bounds, committed."""
    fed, sessions = federation(clip_norm=2.0, secagg_clip=0.01)
    settings = round_settings(fed.config, 4, fed.layout.float_numel, 1)[0]
    fp = settings.fixed_point()
    g = torch.Generator().manual_seed(2)
    xs = {}
    for u in range(4):
        d = torch.randn(fed.layout.float_numel, generator=g)
        d = d / d.norm() * settings.l2_target(2.0)
        assert float(fp.decode(fp.encode(d), 1).norm()) <= 2.0
        xs[u] = fp.encode(d)
    rnd, _, state = run_round(fed, sessions, xs)
    assert state is not None and len(rnd.clients) == 4


def test_a_retry_keeps_the_sample_less_the_excluded_and_tells_its_attempt(caplog):
    """Attempt 1 of a round samples 4 of 8; one advertises a small-order key (excluded for
    the run), another hangs up at stage 1: the attempt aborts (threshold 3). The retry
    samples the same clients less the cheater, with 'attempt' 1 in its settings, though the
    seeded draw of attempt 1 would be another sample."""
    from fl.server.sampling import sample_clients
    fed, sessions = federation(n=8, fraction=0.5, secagg_threshold=3)
    xs = inputs(range(8), fed.layout.float_numel)
    first = fed.sample(1, 0, dict(sessions))
    assert sample_clients(sessions, 0.5, 2, fed.config.seed, 1, 1) != first  # a redraw would differ
    fed.kept = (0, [])
    rnd, task = fed.open_round(1, 0, dict(sessions))
    assert sorted(rnd.participants) == first and fed.settings.attempt == 0
    cheat, gone = first[0], first[1]
    try:
        task.secagg.submit(cheat, 0, {**SecAggClient(cheat, fed.settings.config(), 1).advertise_keys(),
                                      "c_pk": bytes(32)})
    except SecAggError:
        task.secagg.drop(cheat, "caught cheating")
    clients = Clients(task.secagg, {u: xs[u] for u in first if u != cheat}, config=fed.settings.config(),
                      drop={gone: 1})
    with caplog.at_level("INFO", logger="server"):
        fed.collect(rnd, task.deadline)
        clients.join()
        assert fed.finish_round(rnd) is None  # 2 left of threshold 3
        assert set(fed.excluded) == {cheat}
        fed.sessions.update(sessions)  # everyone reconnected, the cheater too
        rnd2, _ = fed.open_round(1, 1, dict(sessions))
    assert sorted(rnd2.participants) == [u for u in first if u != cheat]
    assert fed.settings.attempt == 1 and fed.settings.round == 1
    text = caplog.text
    assert f"client {cheat} is excluded for the rest of the run" in text
    assert "the same sample as the last attempt, 3 of its 4 clients (1 gone, excluded or left out)" in text


def test_a_retried_attempt_trains_from_another_seed_and_attempt_0_from_the_old_one():
    """Attempt 0 keeps the historical seed (plain runs stay bit-identical); attempt 1 trains
    afresh, reproducibly: the same inputs twice would let the server difference two sums."""
    from fl.client import local
    from fl.learning.config import TrainingConfig
    assert local.round_seed(7, 3, 5) == local.round_seed(7, 3, 5, 0) == 7 * 100_003 + 3 * 1009 + 5
    seeds = {local.round_seed(7, 3, 5, a) for a in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 1 << 63 for s in seeds)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 10
    config = TrainingConfig(epochs=1, lr=0.1, batch_size=8, optimizer="sgd")

    def trained(attempt: int) -> torch.Tensor:
        state = local.fit(model, images, labels, None, 3, 7, 5, config, base, attempt=attempt)[0]
        return state["1.weight"]

    first, again, retry = trained(0), trained(0), trained(1)
    assert torch.equal(first, again) and torch.equal(retry, trained(1))
    assert not torch.equal(first, retry)
