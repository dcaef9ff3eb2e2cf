from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from fl.secagg import (
    FixedPoint,
    SecAggAbort,
    SecAggCheat,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    Stage,
)
from fl.secagg import rounds as rounds_module
from fl.secagg.messages import SEALED_BYTES
from fl.secagg.wire import CLIENT_FIELDS, SERVER_FIELDS, decode, encode
from fl.wire.frames import decode_payload, encode_payload

MODEL_SIZE = 421_834  # ImprovedCNN's parameters
MASK32 = (1 << 32) - 1


def _inputs(ids: list[int], length: int, bits: int = 32, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {u: torch.randint(0, 1 << bits, (length,), generator=g) for u in ids}


def _ring_sum(xs: dict[int, torch.Tensor], ids: tuple[int, ...], bits: int = 32) -> torch.Tensor:
    total = torch.zeros_like(next(iter(xs.values())))
    for u in ids:
        total = (total + xs[u]) & ((1 << bits) - 1)
    return total


@dataclass
class Run:
    """One round in memory; ``drop[stage]`` holds the clients that send nothing from that
    stage on, ``hook[stage]`` may rewrite messages on their way."""

    config: SecAggConfig
    xs: dict[int, torch.Tensor]
    round_id: int = 1
    drop: dict[Stage, set[int]] = field(default_factory=dict)
    hook: dict[str, Callable[[int, Any], Any]] = field(default_factory=dict)
    seen: list[Any] = field(default_factory=list)  # every message, both ways
    refused: dict[int, SecAggError] = field(default_factory=dict)  # unmasking answers the server refused

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.config, self.round_id)
        self.clients = {u: SecAggClient(u, self.config, self.round_id) for u in self.xs}

    def _active(self, stage: Stage) -> list[int]:
        gone = set().union(*(ids for s, ids in self.drop.items() if s <= stage))
        return [u for u in self.clients if u not in gone]

    def _send(self, name: str, u: int, msg: Any) -> Any:
        self.seen.append(msg)
        return self.hook[name](u, msg) if name in self.hook else msg

    def run(self) -> torch.Tensor:
        s = self.server
        for u in self._active(Stage.ADVERTISE_KEYS):
            s.receive_keys(u, self._send("keys", u, self.clients[u].advertise_keys()))
        keys = s.broadcast_keys()
        for u in self._active(Stage.SHARE_KEYS):
            s.receive_shares(u, self._send("shares", u, self.clients[u].share_keys(self._send("broadcast", u, keys))))
        routed = s.route_shares()
        for u in self._active(Stage.MASKED_INPUT):
            try:
                msg = self.clients[u].masked_input(self._send("routed", u, routed[u]), self.xs[u])
            except SecAggError:
                continue  # the client refuses the round: a dropout
            s.receive_masked(u, self._send("masked", u, msg))
        request = s.request_unmask()
        for u in self._active(Stage.UNMASKING):
            if u in s.survivors:
                answer = self._send("unmask", u, self.clients[u].unmask(self._send("survivors", u, request)))
                try:
                    s.receive_unmask(u, answer)
                except SecAggError as exc:  # the transport drops that client; the round goes on
                    self.refused[u] = exc
        return s.finish()


def test_full_round_sums_exactly() -> None:
    cfg = SecAggConfig(length=1000, threshold=3)
    xs = _inputs([0, 1, 2, 3, 4], 1000)
    r = Run(cfg, xs)
    total = r.run()
    assert r.server.survivors == (0, 1, 2, 3, 4) and r.server.stage == Stage.DONE
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3, 4)))


def test_fixed_point_round_matches_the_float_sum() -> None:
    fp = FixedPoint()
    g = torch.Generator().manual_seed(3)
    floats = {u: torch.randn(2000, generator=g) * 0.05 for u in (10, 20, 30, 40, 50)}
    xs = {u: fp.encode(x) for u, x in floats.items()}
    total = Run(SecAggConfig(length=2000, threshold=3), xs).run()
    assert torch.equal(total, _ring_sum(xs, tuple(xs)))
    err = (fp.decode(total, 5) - sum(x.double() for x in floats.values())).abs().max().item()
    assert err <= 5 * fp.step / 2  # each of the 5 encodings rounds to the nearest step


def test_server_sees_masked_inputs_only() -> None:
    xs = _inputs([0, 1, 2, 3, 4], 4000)
    r = Run(SecAggConfig(length=4000, threshold=3), xs)
    r.run()
    masked = [m["masked"].to(torch.int64) for m in r.seen if isinstance(m, dict) and "masked" in m]
    assert len(masked) == 5
    for y, x in zip(masked, xs.values()):
        assert (y == x).float().mean() < 0.01
        assert abs(((y - x) & MASK32).double().mean().item() / 2**32 - 0.5) < 0.02  # a uniform offset
        assert torch.equal(y & MASK32, y)


@pytest.mark.parametrize("dropped", [(4,), (1, 3)])
def test_dropouts_after_masked_input_still_count(dropped: tuple[int, ...]) -> None:
    xs = _inputs([0, 1, 2, 3, 4], 500)
    r = Run(SecAggConfig(length=500, threshold=3), xs, drop={Stage.UNMASKING: set(dropped)})
    total = r.run()
    assert r.server.survivors == (0, 1, 2, 3, 4)
    assert set(r.server.responders) == {0, 1, 2, 3, 4} - set(dropped)
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3, 4)))


@pytest.mark.parametrize("dropped", [(2,), (0, 4)])
def test_dropouts_before_masked_input_are_excluded(dropped: tuple[int, ...]) -> None:
    xs = _inputs([0, 1, 2, 3, 4], 500)
    r = Run(SecAggConfig(length=500, threshold=3), xs, drop={Stage.MASKED_INPUT: set(dropped)})
    total = r.run()
    alive = tuple(u for u in xs if u not in dropped)
    assert r.server.sharing == (0, 1, 2, 3, 4) and r.server.survivors == alive
    assert torch.equal(total, _ring_sum(xs, alive))


def test_dropouts_at_every_stage() -> None:
    xs = _inputs(list(range(8)), 300)
    drop = {Stage.SHARE_KEYS: {7}, Stage.MASKED_INPUT: {3}, Stage.UNMASKING: {0}}
    r = Run(SecAggConfig(length=300, threshold=4), xs, drop=drop)
    total = r.run()
    assert r.server.advertised == tuple(range(8))
    assert r.server.sharing == (0, 1, 2, 3, 4, 5, 6)
    assert r.server.survivors == (0, 1, 2, 4, 5, 6)
    assert torch.equal(total, _ring_sum(xs, r.server.survivors))


@pytest.mark.parametrize(
    "drop, where",
    [
        ({Stage.ADVERTISE_KEYS: {0, 1, 2}}, "advertised keys"),
        ({Stage.SHARE_KEYS: {0, 1, 2}}, "shared keys"),
        ({Stage.MASKED_INPUT: {0, 1, 2}}, "sent masked inputs"),
        ({Stage.UNMASKING: {0, 1, 2}}, "answered the unmasking request"),
    ],
)
def test_below_threshold_aborts(drop: dict, where: str) -> None:
    r = Run(SecAggConfig(length=50, threshold=3), _inputs([0, 1, 2, 3, 4], 50), drop=drop)
    with pytest.raises(SecAggAbort, match=where):
        r.run()
    assert r.server.stage == Stage.DONE
    with pytest.raises(SecAggError, match="not expected"):
        r.server.finish()


def test_min_clients_above_threshold() -> None:
    cfg = SecAggConfig(length=50, threshold=2, min_clients=4)
    r = Run(cfg, _inputs([0, 1, 2, 3, 4], 50), drop={Stage.MASKED_INPUT: {0, 1}})
    with pytest.raises(SecAggAbort, match="3 clients sent masked inputs, 4 needed"):
        r.run()


def test_client_aborts_below_threshold_too() -> None:
    cfg = SecAggConfig(length=10, threshold=3)
    server = SecAggServer(SecAggConfig(length=10, threshold=2), 1)  # a server that cheats on t
    clients = [SecAggClient(u, cfg, 1) for u in (0, 1)]
    for c in clients:
        server.receive_keys(c.id, c.advertise_keys())
    with pytest.raises(SecAggAbort, match="2 clients advertised keys, 3 needed"):
        clients[0].share_keys(server.broadcast_keys())
    assert clients[0].stage == Stage.DONE


def test_client_holds_the_shared_set_to_min_clients() -> None:
    cfg = SecAggConfig(length=10, threshold=2, min_clients=3)
    cheat = SecAggServer(SecAggConfig(length=10, threshold=2), 1)  # ignores min_clients
    clients = {u: SecAggClient(u, cfg, 1) for u in (0, 1, 2)}
    keys = _stage(cheat, clients, Stage.SHARE_KEYS)["keys"]
    for u in (0, 1):
        cheat.receive_shares(u, clients[u].share_keys(keys))
    routed = cheat.route_shares()
    with pytest.raises(SecAggAbort, match="2 of this client's group shared keys, 3 needed"):
        clients[0].masked_input(routed[0], torch.zeros(10, dtype=torch.int64))


def _flip(offset: int) -> Callable[[int, Any], Any]:
    def hook(u: int, msg: dict) -> dict:
        if u != 2:
            return msg
        blob = msg["ciphertexts"].clone()
        blob[offset] ^= 1
        return {**msg, "ciphertexts": blob}
    return hook


@pytest.mark.parametrize("offset", [0, 40, SEALED_BYTES - 1, SEALED_BYTES + 50])
def test_a_tampered_share_is_not_held_and_the_round_goes_on(offset: int) -> None:
    """Client 2 cannot open one share routed to it: it keeps masking with every sender (the
    pairwise masks do not depend on the share), reveals nothing of that dealer, and the
    round sums all five inputs exactly."""
    xs = _inputs([0, 1, 2, 3, 4], 200)
    r = Run(SecAggConfig(length=200, threshold=3), xs, hook={"routed": _flip(offset)})
    total = r.run()
    assert r.server.survivors == (0, 1, 2, 3, 4)
    assert r.clients[2].unopened == ((0,) if offset < SEALED_BYTES else (1,))
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3, 4)))


def _routed(r: Run) -> dict[int, dict]:
    s = r.server
    for u, c in r.clients.items():
        s.receive_keys(u, c.advertise_keys())
    keys = s.broadcast_keys()
    for u, c in r.clients.items():
        s.receive_shares(u, c.share_keys(keys))
    return s.route_shares()


def test_an_unopenable_share_names_its_dealer() -> None:
    cfg = SecAggConfig(length=20, threshold=3)
    r = Run(cfg, _inputs([0, 1, 2, 3], 20))
    msg = _flip(SEALED_BYTES + 3)(2, _routed(r)[2])  # the second sender to client 2 is client 1
    r.clients[2].masked_input(msg, r.xs[2])
    assert r.clients[2].unopened == (1,)
    # Re-addressed: the same ciphertexts presented as coming from other senders.
    r = Run(cfg, _inputs([0, 1, 2, 3], 20))
    routed = _routed(r)
    swapped = routed[2]["ciphertexts"].view(-1, SEALED_BYTES).flip(0).reshape(-1).contiguous()
    r.clients[2].masked_input({**routed[2], "ciphertexts": swapped}, r.xs[2])
    assert r.clients[2].unopened == (0, 3)  # the middle one, client 1's, stays in place
    # Untouched, every share opens.
    r = Run(cfg, _inputs([0, 1, 2, 3], 20))
    assert set(r.clients[2].masked_input(_routed(r)[2], r.xs[2])) == {"round", "masked"}
    assert r.clients[2].unopened == ()


def test_share_replayed_from_another_round_is_refused() -> None:
    cfg = SecAggConfig(length=20, threshold=3)
    old = Run(cfg, _inputs([0, 1, 2], 20), round_id=1)
    old.run()
    old_routed = [m for m in old.seen if isinstance(m, dict) and "senders" in m]
    new = Run(cfg, _inputs([0, 1, 2], 20), round_id=2)
    routed = _routed(new)
    with pytest.raises(SecAggError, match="round 1, expected round 2"):
        new.clients[0].masked_input(old_routed[0], new.xs[0])
    replay = {**routed[0], "ciphertexts": old_routed[0]["ciphertexts"], "digests": old_routed[0]["digests"]}
    new.clients[0].masked_input(replay, new.xs[0])
    assert new.clients[0].unopened == (1, 2)


def test_a_dealer_of_unopenable_shares_aborts_as_a_suspect() -> None:
    """Client 2 seals garbage to every neighbour: they all go on without its shares, and its
    self-mask seed has only its own share. The old clients left the round instead (so one
    dealer emptied every round it was in). The abort names client 2 as a suspect (a
    holder's word against a dealer's: not proof)."""
    def garbage(u: int, msg: dict) -> dict:
        return {**msg, "ciphertexts": torch.zeros_like(msg["ciphertexts"])} if u == 2 else msg

    r = Run(SecAggConfig(length=20, threshold=3), _inputs([0, 1, 2, 3, 4], 20), hook={"shares": garbage})
    with pytest.raises(SecAggAbort, match=r"1 shares of client 2's self-mask seed, 3 needed \(4 holder\(s\) could "
                                          r"not open the shares it dealt\)") as exc:
        r.run()
    assert exc.value.suspects == (2,) and exc.value.culprits == ()
    assert all(r.clients[u].unopened == (2,) for u in (0, 1, 3, 4)) and not r.refused


def _corrupt_unmask(cheater: int, field_name: str, index: int) -> Callable[[int, Any], Any]:
    """The ``index``-th share of ``field_name`` in ``cheater``'s unmasking answer, one bit flipped."""
    def hook(u: int, msg: dict) -> dict:
        if u != cheater:
            return msg
        shares = msg[field_name].clone()
        shares[32 * index] ^= 1
        return {**msg, field_name: shares}
    return hook


def test_a_holder_revealing_a_wrong_share_is_named_and_the_round_goes_on() -> None:
    """Client 0 reveals a wrong share of client 1's self-mask seed: the server checks it
    against the digest client 1 dealt it with, refuses client 0's answer naming client 0
    (SecAggCheat), and rebuilds every secret from the others' shares: the sum is exact. The
    old server aborted the round, unattributed, at the commitment check."""
    xs = _inputs([0, 1, 2, 3, 4], 20)
    r = Run(SecAggConfig(length=20, threshold=3), xs, hook={"unmask": _corrupt_unmask(0, "b_shares", 1)})
    total = r.run()
    assert set(r.refused) == {0}
    exc = r.refused[0]
    assert isinstance(exc, SecAggCheat) and exc.client == 0
    assert str(exc) == "client 0 revealed a share of client 1's self-mask seed that is not the one dealt to it"
    assert r.server.responders == (1, 2, 3, 4)
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3, 4)))  # client 0's input still counts


def test_a_wrong_share_of_a_dropped_clients_key_is_named_too() -> None:
    xs = _inputs([0, 1, 2, 3, 4], 20)
    r = Run(SecAggConfig(length=20, threshold=3), xs, drop={Stage.MASKED_INPUT: {4}},
            hook={"unmask": _corrupt_unmask(2, "sk_shares", 0)})
    total = r.run()
    assert isinstance(r.refused[2], SecAggCheat) and r.refused[2].client == 2
    assert "client 4's mask key" in str(r.refused[2])
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3)))


def test_a_client_lying_about_its_own_share_aborts_naming_it() -> None:
    """Its own share carries no digest (it dealt it to itself): the rebuilt seed fails its
    commitment, and the abort names the client as its culprit."""
    r = Run(SecAggConfig(length=20, threshold=5), _inputs([0, 1, 2, 3, 4], 20),
            hook={"unmask": _corrupt_unmask(0, "b_shares", 0)})
    with pytest.raises(SecAggAbort, match="client 0's verified shares do not rebuild") as exc:
        r.run()
    assert exc.value.culprits == (0,)


def test_a_dealer_of_inconsistent_shares_aborts_naming_it(monkeypatch) -> None:
    """Client 2 deals a share off its polynomial (and digests what it dealt, so every holder
    and every check of a revealed share passes): the rebuilt secret fails client 2's
    commitment, and only client 2 can have caused that."""
    real_share = rounds_module.shamir.share
    dealer = {"calls": 0}

    def share(secret: bytes, t: int, n: int):
        out = real_share(secret, t, n)
        dealer["calls"] += 1
        if dealer["calls"] == 5:  # client 2's first sharing (b): clients deal b, then s^SK, in id order
            x, y = out[1]
            out[1] = (x, bytes([y[0] ^ 1]) + y[1:])
        return out

    monkeypatch.setattr(rounds_module.shamir, "share", share)
    r = Run(SecAggConfig(length=20, threshold=5), _inputs([0, 1, 2, 3, 4], 20))
    with pytest.raises(SecAggAbort, match="client 2's verified shares do not rebuild the self-mask seed") as exc:
        r.run()
    assert exc.value.culprits == (2,) and not r.refused


def test_a_share_that_does_not_match_its_digest_is_not_held() -> None:
    """A dealer's digest that does not match what it sealed: the holder keeps no such share,
    so it never reveals it (and is never blamed for it)."""
    def bad_digest(u: int, msg: dict) -> dict:
        if u != 1:
            return msg
        digests = msg["digests"].clone()
        digests[0] ^= 1  # the digest of the share for its first receiver, client 0
        return {**msg, "digests": digests}

    r = Run(SecAggConfig(length=20, threshold=3), _inputs([0, 1, 2, 3], 20), hook={"shares": bad_digest})
    total = r.run()
    assert r.server._routed[0] == [1, 2, 3] and r.clients[0].unopened == (1,)
    assert torch.equal(total, _ring_sum(r.xs, (0, 1, 2, 3)))  # client 1's other holders rebuild its secret


SMALL_ORDER = [bytes(32), (1).to_bytes(32, "little"),
               bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]


@pytest.mark.parametrize("point", SMALL_ORDER)
@pytest.mark.parametrize("name", ["c_pk", "s_pk"])
def test_a_small_order_public_key_is_refused_at_stage_0(point: bytes, name: str) -> None:
    """With such a key every key agreement gives the all-zero secret: the old server took
    it, every honest neighbour then failed at stage 2 and the round never completed."""
    s = SecAggServer(SecAggConfig(length=10, threshold=2), 1)
    msg = {**SecAggClient(3, s.config, 1).advertise_keys(), name: point}
    with pytest.raises(SecAggCheat, match="^client 3 advertised a public key of small order") as exc:
        s.receive_keys(3, msg)
    assert exc.value.client == 3 and s.waiting_for is None and not s._c_pk
    for u in (0, 1):
        s.receive_keys(u, SecAggClient(u, s.config, 1).advertise_keys())
    assert s.broadcast_keys()["ids"].tolist() == [0, 1]


def test_secagg_plus_groups() -> None:
    ids = list(range(11))
    cfg = SecAggConfig(length=300, threshold=3, num_shares=5)
    xs = _inputs(ids, 300)
    r = Run(cfg, xs, drop={Stage.MASKED_INPUT: {4}, Stage.UNMASKING: {7}})
    total = r.run()
    shares = [m for m in r.seen if isinstance(m, dict) and "receivers" in m]
    assert all(m["receivers"].numel() == 4 for m in shares)  # 4 neighbours, not 10
    assert r.server.survivors == tuple(u for u in ids if u != 4)
    assert torch.equal(total, _ring_sum(xs, r.server.survivors))


def test_secagg_plus_leaves_out_a_client_whose_group_is_gone() -> None:
    ids = list(range(9))
    cfg = SecAggConfig(length=30, threshold=3, num_shares=5)
    r = Run(cfg, _inputs(ids, 30))
    s = r.server
    for u, c in r.clients.items():
        s.receive_keys(u, c.advertise_keys())
    keys = s.broadcast_keys()
    lonely = 0
    left = set(s._links[lonely][:3])  # 3 of client 0's 4 neighbours drop before sharing
    for u, c in r.clients.items():
        if u not in left:
            s.receive_shares(u, c.share_keys(keys))
    routed = s.route_shares()
    assert lonely not in s.sharing and not left & set(s.sharing)
    for u in s.sharing:
        s.receive_masked(u, r.clients[u].masked_input(routed[u], r.xs[u]))
    request = s.request_unmask()
    for u in s.survivors:
        s.receive_unmask(u, r.clients[u].unmask(request))
    assert torch.equal(s.finish(), _ring_sum(r.xs, s.survivors))


def test_messages_are_plain_and_survive_the_wire() -> None:
    r = Run(SecAggConfig(length=100, threshold=3), _inputs([0, 1, 2, 3], 100), drop={Stage.MASKED_INPUT: {3}})
    r.run()
    kinds = set()
    for msg in r.seen:
        assert isinstance(msg, dict) and all(isinstance(k, str) for k in msg)
        for v in msg.values():
            assert type(v) in (int, bytes) or (isinstance(v, torch.Tensor) and v.ndim == 1), type(v)
            if isinstance(v, torch.Tensor):
                kinds.add(v.dtype)
        # The frames carry them through secagg_wire (keys as uint8, the uint32 ring as int32
        # bits) and safe_decode's allowlist; decode gives back exactly the core's message.
        stage, fields = next((s, f) for table in (CLIENT_FIELDS, SERVER_FIELDS) for s, f in table.items()
                             if set(f) == set(msg))
        back, _ = decode(decode_payload(encode_payload(encode(stage, msg))), stage, fields)
        assert set(back) == set(msg)
        for k, v in msg.items():
            assert torch.equal(back[k], v) if isinstance(v, torch.Tensor) else back[k] == v
    assert kinds == {torch.int64, torch.uint8, torch.uint32}


def _stage(server: SecAggServer, clients: dict[int, SecAggClient], until: Stage) -> dict:
    out: dict = {}
    for u, c in clients.items():
        server.receive_keys(u, c.advertise_keys())
    out["keys"] = server.broadcast_keys()
    if until == Stage.SHARE_KEYS:
        return out
    for u, c in clients.items():
        server.receive_shares(u, c.share_keys(out["keys"]))
    out["routed"] = server.route_shares()
    return out


def test_server_refuses_bad_messages_with_one_line_and_no_state_change() -> None:
    cfg = SecAggConfig(length=10, threshold=2)
    s = SecAggServer(cfg, 5)
    c = SecAggClient(1, cfg, 5)
    good = c.advertise_keys()
    bad_cases = [
        (1, "not a dict", "must be a dict"),
        (1, {**good, "extra": 1}, "exactly the fields"),
        (1, {**good, "round": 4}, "round 4, expected round 5"),
        (1, {**good, "round": True}, "expected round 5"),
        (1, {**good, "c_pk": good["c_pk"][:31]}, "'c_pk' must be 32 bytes"),
        (1, {**good, "s_pk": list(good["s_pk"])}, "'s_pk' must be 32 bytes"),
        (-1, good, "client id"),
        (True, good, "client id"),
        (1, {**good, "s_pk": good["c_pk"]}, "already in use"),
    ]
    for cid, msg, match in bad_cases:
        with pytest.raises(SecAggError, match=match) as e:
            s.receive_keys(cid, msg)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    assert s.waiting_for is None
    s.receive_keys(1, good)
    with pytest.raises(SecAggError, match="already advertised"):
        s.receive_keys(1, good)
    with pytest.raises(SecAggError, match="already in use"):
        s.receive_keys(2, good)
    with pytest.raises(SecAggError, match="not expected at stage ADVERTISE_KEYS"):
        s.receive_masked(1, {"round": 5, "masked": torch.zeros(10, dtype=torch.uint32)})


def test_server_validates_later_stages() -> None:
    cfg = SecAggConfig(length=10, threshold=2, bits=20)
    s = SecAggServer(cfg, 1)
    clients = {u: SecAggClient(u, cfg, 1) for u in (0, 1, 2)}
    for u, c in clients.items():
        s.receive_keys(u, c.advertise_keys())
    keys = s.broadcast_keys()
    shares = {u: c.share_keys(keys) for u, c in clients.items()}
    with pytest.raises(SecAggError, match="not in this stage"):
        s.receive_shares(9, shares[0])
    with pytest.raises(SecAggError, match="each of its 2 neighbours"):
        s.receive_shares(0, shares[1])
    with pytest.raises(SecAggError, match="'ciphertexts' must hold 2 items"):
        s.receive_shares(0, {**shares[0], "ciphertexts": shares[0]["ciphertexts"][:-1]})
    with pytest.raises(SecAggError, match="increasing order"):
        s.receive_shares(0, {**shares[0], "receivers": shares[0]["receivers"].flip(0)})
    with pytest.raises(SecAggError, match="1-D int64"):
        s.receive_shares(0, {**shares[0], "receivers": shares[0]["receivers"].to(torch.int32)})
    assert s.waiting_for == (0, 1, 2)
    for u in (0, 1):
        s.receive_shares(u, shares[u])
    assert s.waiting_for == (2,)
    routed = s.route_shares()
    assert s.sharing == (0, 1) and routed[0]["senders"].tolist() == [1]
    good = clients[0].masked_input(routed[0], torch.zeros(10, dtype=torch.int64))
    assert good["masked"].dtype == torch.uint32
    for msg, match in [
        ({**good, "masked": good["masked"].to(torch.int64)}, "uint32"),
        ({**good, "masked": good["masked"][:9]}, "9 elements, expected 10"),
        ({**good, "masked": torch.full((10,), 1 << 20, dtype=torch.uint32)}, r"values in \[0, 2\^20\)"),
        ({**good, "masked": good["masked"].reshape(2, 5)}, "1-D"),
    ]:
        with pytest.raises(SecAggError, match=match):
            s.receive_masked(0, msg)
    with pytest.raises(SecAggError, match="not in this stage"):
        s.receive_masked(2, good)
    s.receive_masked(0, good)
    with pytest.raises(SecAggError, match="already sent"):
        s.receive_masked(0, good)
    s.receive_masked(1, clients[1].masked_input(routed[1], torch.ones(10, dtype=torch.int64)))
    request = s.request_unmask()
    answer = clients[0].unmask(request)
    with pytest.raises(SecAggError, match="its own b share"):
        s.receive_unmask(0, {**answer, "b_owners": answer["b_owners"][1:], "b_shares": answer["b_shares"][32:]})
    with pytest.raises(SecAggError, match="its own b share"):
        s.receive_unmask(0, {**answer, "b_owners": torch.tensor([0, 9]), "b_shares": answer["b_shares"]})
    with pytest.raises(SecAggError, match="'b_shares' must hold 2 items"):
        s.receive_unmask(0, {**answer, "b_shares": answer["b_shares"][:40]})
    s.receive_unmask(0, answer)
    s.receive_unmask(1, clients[1].unmask(request))
    assert s.waiting_for == ()
    assert torch.equal(s.finish(), torch.ones(10, dtype=torch.int64))


def test_client_refuses_bad_server_messages() -> None:
    cfg = SecAggConfig(length=10, threshold=2)
    s = SecAggServer(cfg, 1)
    clients = {u: SecAggClient(u, cfg, 1) for u in (0, 1, 2)}
    out = _stage(s, clients, Stage.SHARE_KEYS)
    keys = out["keys"]
    c = clients[0]
    with pytest.raises(SecAggError, match="not expected at stage SHARE_KEYS"):
        c.unmask({"round": 1, "survivors": torch.tensor([0, 1])})
    s_pks = keys["s_pks"].clone()
    s_pks[0] ^= 1
    with pytest.raises(SecAggError, match="altered this client's public keys"):
        c.share_keys({**keys, "s_pks": s_pks})
    s_pks = keys["s_pks"].clone()
    s_pks[64:96] = keys["s_pks"][32:64]
    with pytest.raises(SecAggError, match="repeats a public key"):
        c.share_keys({**keys, "s_pks": s_pks})
    stranger = SecAggClient(7, cfg, 1)
    stranger.advertise_keys()
    with pytest.raises(SecAggError, match="does not list this client"):
        stranger.share_keys(keys)
    with pytest.raises(SecAggError, match="graph_seed"):
        c.share_keys({**keys, "graph_seed": b"short"})
    assert c.stage == Stage.SHARE_KEYS
    shares = {u: cl.share_keys(keys) for u, cl in clients.items()}
    for u, m in shares.items():
        s.receive_shares(u, m)
    routed = s.route_shares()
    with pytest.raises(SecAggError, match="outside this client's group"):
        c.masked_input({**routed[0], "senders": torch.tensor([1, 5])}, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(SecAggError, match=r"int64\[10\]"):
        c.masked_input(routed[0], torch.zeros(10))
    with pytest.raises(SecAggError, match="lie in"):
        c.masked_input(routed[0], torch.full((10,), 1 << 32))
    c.masked_input(routed[0], torch.zeros(10, dtype=torch.int64))
    with pytest.raises(SecAggError, match="omits this client"):
        c.unmask({"round": 1, "survivors": torch.tensor([1, 2])})
    with pytest.raises(SecAggError, match="advertised no keys"):
        c.unmask({"round": 1, "survivors": torch.tensor([0, 1, 9])})
    answer = c.unmask({"round": 1, "survivors": torch.tensor([0, 1])})
    assert answer["b_owners"].tolist() == [0, 1] and answer["sk_owners"].tolist() == [2]  # never both for one client
    assert c.stage == Stage.DONE
    with pytest.raises(SecAggError, match="not expected at stage DONE"):
        c.unmask({"round": 1, "survivors": torch.tensor([0, 1])})


@pytest.mark.parametrize(
    "kwargs",
    [{"length": 0, "threshold": 2}, {"length": 5, "threshold": 1}, {"length": 5, "threshold": 3, "num_shares": 4},
     {"length": 5, "threshold": 5, "num_shares": 3}, {"length": 5, "threshold": 3, "min_clients": 2},
     {"length": 5, "threshold": 2, "bits": 63}],
)
def test_config_refuses_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SecAggConfig(**kwargs)


def test_model_sized_round_runs_in_reasonable_time() -> None:
    fp = FixedPoint()
    g = torch.Generator().manual_seed(0)
    xs = {u: fp.encode(torch.randn(MODEL_SIZE, generator=g) * 0.01) for u in range(5)}
    start = time.perf_counter()
    r = Run(SecAggConfig(length=MODEL_SIZE, threshold=3), xs, drop={Stage.MASKED_INPUT: {4}})
    total = r.run()
    assert time.perf_counter() - start < 30  # ~0.3 s on an idle 2-core machine
    assert torch.equal(total, _ring_sum(xs, (0, 1, 2, 3)))
