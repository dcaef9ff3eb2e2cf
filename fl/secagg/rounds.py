"""The secure-aggregation round as two state machines, ``SecAggClient`` and ``SecAggServer``.

The four stages of Bonawitz et al. (2017), semi-honest variant (no signatures, so no
consistency-check stage), with SecAgg+ groups as an option (``SecAggConfig.num_shares``)::

  client u                                               server
  0 AdvertiseKeys   advertise_keys() -> c_pk, s_pk  ──▶  receive_keys(u, msg)   (U1)
                    share_keys(msg) ◀── all keys, graph seed ── broadcast_keys()
  1 ShareKeys       t-of-group shares of b_u and s_u^SK,
                    sealed to each neighbour, with
                    a digest of each share          ──▶  receive_shares(u, msg)  (U2)
                    masked_input(msg, x) ◀── shares sealed to u ── route_shares()[u]
  2 MaskedInput     y_u = x_u + masks               ──▶  receive_masked(u, msg)  (U3: sum y)
                    unmask(msg) ◀── survivors U3 ── request_unmask()
  3 Unmasking       shares of b_v (v in U3),
                    of s_v^SK (v dropped)           ──▶  receive_unmask(u, msg)
                                                         finish() -> sum of x_u, u in U3

Each method takes and returns plain messages (``secagg.messages``); each stage's message is
validated in full before anything changes, and a bad one raises ``SecAggError`` with the
state untouched, so the caller just drops that peer. The server closes a stage when the
caller says so (everyone expected has answered, ``waiting_for`` is empty, or a deadline
passed): clients that have not answered by then are dropouts. A stage closing with fewer
than ``min_clients`` clients, or a secret with fewer than ``threshold`` shares left, raises
``SecAggAbort``; nothing of the round is usable after it.

What the server learns: the sum over U3 and who is in each set. A survivor's masked input
is uniform without its self mask, and the server only gets ``b_u`` for survivors and
``s_u^SK`` for dropped clients, never both for one client (a client answers the unmasking
request once, and never reveals its own mask key). Privacy needs fewer than ``threshold``
colluding share holders per group. A server that sends different survivor lists to
different clients gets ``b_u`` shares from some and ``s_u^SK`` shares from the others: with
``threshold`` above half the group it cannot collect ``threshold`` of both. A server that
substitutes public keys is not stopped: that needs signed keys (a PKI), not done here.

What a cheating participant is caught at (``SecAggCheat`` names it, and the caller excludes
it): a public key of small order, at stage 0 (it would make every key agreement with it
fail); an unmasking share that is not the one its dealer committed to, at stage 3 (its
shares are refused and the round goes on with the others'). A dealer whose committed shares
do not rebuild its committed secret aborts the round with ``SecAggAbort.culprits`` naming
it. A holder checks each share it opens against the dealer's digest, so an honest holder
never reveals a share that fails it; it keeps no such share (nor one that fails
authentication) and goes on, revealing nothing of that dealer. Whether the dealer or the
holder lied cannot be proven without the holder's private key, so a secret that cannot be
rebuilt for want of such shares aborts with ``SecAggAbort.suspects`` naming the dealer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from fl.secagg import shamir
from fl.secagg.crypto import (
    KEY_BYTES,
    agree,
    check_public,
    commit,
    context,
    generate_keypair,
    open_sealed,
    private_bytes,
    private_key,
    public_bytes,
    seal,
    share_digest,
)
from fl.secagg.errors import SecAggAbort, SecAggCheat, SecAggError
from fl.secagg.graph import group, neighbours
from fl.secagg.masking import mask_input, pair_key, remove_masks, ring_mask, self_key
from fl.secagg.messages import (
    ADVERTISE,
    DIGEST_PAIR,
    KEYS,
    MASKED,
    ROUTED,
    SEALED_BYTES,
    SHARE_BYTES,
    SHARES,
    SURVIVORS,
    UNMASK,
    blob_tensor,
    check_fields,
    check_id,
    get_blob,
    get_bytes,
    get_ids,
    get_ring,
    get_round,
    ids_tensor,
    to_wire,
)

Message = dict[str, Any]


class Stage(IntEnum):
    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASKING = 3
    DONE = 4  # finished, or aborted


@dataclass(frozen=True)
class SecAggConfig:
    """What both ends of a round must agree on (the server sends it with the round)."""

    length: int  # coordinates of the summed vector
    threshold: int  # t: any t members of a client's group reconstruct its secrets
    bits: int = 32  # the ring Z_{2^bits}: FixedPoint.bits
    num_shares: int | None = None  # SecAgg+ group size (odd); None: everyone (SecAgg)
    min_clients: int | None = None  # fewest clients at any stage; None: threshold

    def __post_init__(self) -> None:
        if type(self.length) is not int or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")
        if type(self.threshold) is not int or self.threshold < 2:
            raise ValueError(f"threshold must be an int >= 2 (one share would reveal a secret), got {self.threshold!r}")
        if type(self.bits) is not int or not 8 <= self.bits <= 62:
            raise ValueError(f"bits must be an int in [8, 62], got {self.bits!r}")
        if self.num_shares is not None and (
            type(self.num_shares) is not int or self.num_shares % 2 == 0 or self.num_shares < self.threshold
        ):
            raise ValueError(f"num_shares must be None or an odd int >= threshold, got {self.num_shares!r}")
        if self.min_clients is not None and (type(self.min_clients) is not int or self.min_clients < self.threshold):
            raise ValueError(f"min_clients must be None or an int >= threshold, got {self.min_clients!r}")

    @property
    def minimum(self) -> int:
        return self.threshold if self.min_clients is None else self.min_clients


def _check_round(round_id: object) -> int:
    return check_id(round_id, "round")


def _chunks(blob: bytes, size: int) -> list[bytes]:
    return [blob[i:i + size] for i in range(0, len(blob), size)]


def _digests(plain: bytes, round_id: int, dealer: int, holder: int) -> bytes:
    """The digest pair of a sealed share's plaintext (share of b_u | share of s_u^SK)."""
    return (share_digest(b"b", round_id, dealer, holder, plain[:KEY_BYTES])
            + share_digest(b"sk", round_id, dealer, holder, plain[KEY_BYTES:]))


class _Machine:
    stage: Stage
    round: int
    config: SecAggConfig

    def _at(self, stage: Stage, what: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{what} is not expected at stage {self.stage.name}")

    def _abort(self, reason: str, culprits: tuple[int, ...] = (), suspects: tuple[int, ...] = ()) -> SecAggAbort:
        self.stage = Stage.DONE
        return SecAggAbort(f"round {self.round}: {reason}", culprits, suspects)


class SecAggClient(_Machine):
    """One client's side of one round (fresh keys and seeds: never reuse it)."""

    def __init__(self, client_id: int, config: SecAggConfig, round_id: int) -> None:
        self.id = check_id(client_id, "client id")
        self.round = _check_round(round_id)
        self.config = config
        self.stage = Stage.ADVERTISE_KEYS
        self.unopened: tuple[int, ...] = ()  # dealers whose shares to this client failed to open
        self._c_sk, self._c_pk = generate_keypair()  # encrypts shares in transit
        self._s_sk, self._s_pk = generate_keypair()  # agrees pairwise mask keys
        self._b = os.urandom(KEY_BYTES)  # self-mask seed b_u

    def advertise_keys(self) -> Message:
        """Stage 0: the two public keys."""
        self._at(Stage.ADVERTISE_KEYS, "advertise_keys")
        self.stage = Stage.SHARE_KEYS
        return {"round": self.round, "c_pk": self._c_pk, "s_pk": self._s_pk}

    def share_keys(self, msg: Message) -> Message:
        """Stage 1: from the server's key broadcast, shares of ``b_u`` and ``s_u^SK`` for
        each member of the group, sealed to each neighbour."""
        self._at(Stage.SHARE_KEYS, "key broadcast")
        m = check_fields(msg, KEYS, "key broadcast")
        get_round(m, self.round)
        ids = get_ids(m, "ids")
        c_pks = _chunks(get_blob(m, "c_pks", KEY_BYTES, len(ids)), KEY_BYTES)
        s_pks = _chunks(get_blob(m, "s_pks", KEY_BYTES, len(ids)), KEY_BYTES)
        seed = get_bytes(m, "graph_seed", KEY_BYTES)
        if self.id not in ids:
            raise SecAggError("key broadcast does not list this client")
        me = ids.index(self.id)
        if c_pks[me] != self._c_pk or s_pks[me] != self._s_pk:
            raise SecAggError("key broadcast altered this client's public keys")
        if len(set(c_pks) | set(s_pks)) != 2 * len(ids):
            raise SecAggError("key broadcast repeats a public key")
        if len(ids) < self.config.minimum:
            raise self._abort(f"{len(ids)} clients advertised keys, {self.config.minimum} needed")
        links = neighbours(ids, seed, self.config.num_shares)
        members = group(links, self.id)
        if len(members) < self.config.threshold:
            raise self._abort(f"a group of {len(members)} cannot meet threshold {self.config.threshold}")
        c_pk, s_pk = dict(zip(ids, c_pks)), dict(zip(ids, s_pks))
        t = self.config.threshold
        b_shares = shamir.share(self._b, t, len(members))
        sk_shares = shamir.share(private_bytes(self._s_sk), t, len(members))
        self._ids = frozenset(ids)
        self._links = links[self.id]
        self._s_pk_of = {v: s_pk[v] for v in self._links}
        self._enc_key = {}
        receivers, sealed, digests = [], [], []
        for (_, b_share), (_, sk_share), v in zip(b_shares, sk_shares, members):
            plain = b_share + sk_share
            if v == self.id:
                self._own_share = plain
                continue
            key = agree(self._c_sk, c_pk[v], context(b"share-key", self.round, min(self.id, v), max(self.id, v)))
            self._enc_key[v] = key
            sealed.append(seal(key, plain, context(b"share", self.round, self.id, v)))
            digests.append(_digests(plain, self.round, self.id, v))
            receivers.append(v)
        self.stage = Stage.MASKED_INPUT
        return {
            "round": self.round,
            "receivers": ids_tensor(receivers),
            "ciphertexts": blob_tensor(b"".join(sealed)),
            "digests": blob_tensor(b"".join(digests)),
            "b_commit": commit(self._b, self.round, self.id),
        }

    def masked_input(self, msg: Message, x: torch.Tensor) -> Message:
        """Stage 2: open the shares routed to this client, then mask ``x`` (int64 ring
        elements, ``FixedPoint.encode``) with the self mask and a pairwise mask per sender.

        A share that fails authentication or its dealer's digest is not held, and the round
        goes on (the pairwise mask with its dealer does not depend on it): this client then
        reveals no share of that dealer's secrets (``unopened`` names the dealers). Leaving
        instead would let one dealer of garbage empty every round it is in."""
        self._at(Stage.MASKED_INPUT, "routed shares")
        m = check_fields(msg, ROUTED, "routed shares")
        get_round(m, self.round)
        senders = get_ids(m, "senders", max_count=len(self._links))
        if not set(senders) <= set(self._links):
            raise SecAggError("routed shares from a client outside this client's group")
        sealed = _chunks(get_blob(m, "ciphertexts", SEALED_BYTES, len(senders)), SEALED_BYTES)
        digests = _chunks(get_blob(m, "digests", DIGEST_PAIR, len(senders)), DIGEST_PAIR)
        bits = self.config.bits
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.shape != (self.config.length,):
            raise SecAggError(f"input must be int64[{self.config.length}] ring elements")
        if int(x.min()) < 0 or int(x.max()) >> bits:
            raise SecAggError(f"input values must lie in [0, 2^{bits})")
        held, unopened = {}, []
        for v, blob, digest in zip(senders, sealed, digests):
            try:
                plain = open_sealed(self._enc_key[v], blob, context(b"share", self.round, v, self.id))
            except SecAggError:
                unopened.append(v)
                continue
            if _digests(plain, self.round, v, self.id) != digest:
                unopened.append(v)
                continue
            held[v] = plain
        # The group is everyone in SecAgg: then the senders are all of U2, held to min_clients.
        needed = self.config.minimum if len(self._links) + 1 == len(self._ids) else self.config.threshold
        if len(senders) + 1 < needed:
            raise self._abort(f"{len(senders) + 1} of this client's group shared keys, {needed} needed")
        pair_keys = {v: pair_key(self._s_sk, self._s_pk_of[v], self.round, self.id, v) for v in senders}
        y = mask_input(x, bits, self_key(self._b, self.round, self.id), pair_keys, self.id)
        self._held = held
        self.unopened = tuple(unopened)
        self.stage = Stage.UNMASKING
        return {"round": self.round, "masked": to_wire(y, bits)}

    def unmask(self, msg: Message) -> Message:
        """Stage 3: for each group member that shared keys, its ``b`` share if it survived,
        its ``s^SK`` share if it dropped. Never both: this is answered once."""
        self._at(Stage.UNMASKING, "survivor list")
        m = check_fields(msg, SURVIVORS, "survivor list")
        get_round(m, self.round)
        survivors = set(get_ids(m, "survivors", max_count=len(self._ids)))
        if self.id not in survivors:
            raise SecAggError("survivor list omits this client")
        if not survivors <= self._ids:
            raise SecAggError("survivor list names a client that advertised no keys")
        if len(survivors) < self.config.minimum:
            raise self._abort(f"{len(survivors)} clients sent masked inputs, {self.config.minimum} needed")
        shares = dict(self._held)
        shares[self.id] = self._own_share
        b_owners = [u for u in sorted(shares) if u in survivors]
        sk_owners = [u for u in sorted(shares) if u not in survivors]
        self.stage = Stage.DONE
        # Done with the secrets: drop them (Python cannot promise to scrub the memory).
        self._b = self._s_sk = self._c_sk = self._held = self._own_share = self._enc_key = None  # type: ignore[assignment]
        return {
            "round": self.round,
            "b_owners": ids_tensor(b_owners),
            "b_shares": blob_tensor(b"".join(shares[u][:SHARE_BYTES] for u in b_owners)),
            "sk_owners": ids_tensor(sk_owners),
            "sk_shares": blob_tensor(b"".join(shares[u][SHARE_BYTES:] for u in sk_owners)),
        }


class SecAggServer(_Machine):
    """The server's side of one round: it routes, sums and unmasks, and learns only the sum.

    ``receive_*`` take a message from the client the transport authenticated as
    ``client_id``; the stage-closing methods (``broadcast_keys``, ``route_shares``,
    ``request_unmask``, ``finish``) move to the next stage. Memory: one int64 ring vector
    for the running sum, plus the small keys and shares."""

    def __init__(self, config: SecAggConfig, round_id: int, *, graph_seed: bytes | None = None) -> None:
        self.config = config
        self.round = _check_round(round_id)
        if graph_seed is not None and (not isinstance(graph_seed, bytes) or len(graph_seed) != KEY_BYTES):
            raise ValueError(f"graph_seed must be {KEY_BYTES} bytes")
        self._seed = graph_seed or os.urandom(KEY_BYTES)
        self.stage = Stage.ADVERTISE_KEYS
        self._c_pk: dict[int, bytes] = {}
        self._s_pk: dict[int, bytes] = {}
        self._sealed: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> sealed share
        self._commit: dict[int, bytes] = {}
        self._digests: dict[int, dict[int, bytes]] = {}  # dealer -> holder -> digest pair
        self._routed: dict[int, list[int]] = {}  # receiver -> senders whose shares it got
        self._masked: set[int] = set()
        self._answers: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = {}
        self._unopened: dict[int, set[int]] = {}  # dealer -> holders that could not open its share
        self._total: torch.Tensor | None = None
        self.advertised: tuple[int, ...] = ()  # U1: advertised keys
        self.sharing: tuple[int, ...] = ()  # U2: shared keys (and were routed shares)
        self.survivors: tuple[int, ...] = ()  # U3: sent masked inputs; the sum is theirs
        self.responders: tuple[int, ...] = ()  # answered the unmasking request

    @property
    def waiting_for(self) -> tuple[int, ...] | None:
        """Clients whose message for the open stage has not arrived (None at stage 0, where
        anyone may join): the caller may close the stage when this is empty."""
        if self.stage == Stage.SHARE_KEYS:
            return tuple(u for u in self.advertised if u not in self._sealed)
        if self.stage == Stage.MASKED_INPUT:
            return tuple(u for u in self.sharing if u not in self._masked)
        if self.stage == Stage.UNMASKING:
            return tuple(u for u in self.survivors if u not in self._answers)
        return None if self.stage == Stage.ADVERTISE_KEYS else ()

    def _member(self, client_id: object, expected: tuple[int, ...], what: str) -> int:
        cid = check_id(client_id, "client id")
        if cid not in expected:
            raise SecAggError(f"{what} from client {cid}, which is not in this stage")
        return cid

    # --- stage 0: AdvertiseKeys --------------------------------------------------------

    def receive_keys(self, client_id: int, msg: Message) -> None:
        self._at(Stage.ADVERTISE_KEYS, "public keys")
        cid = check_id(client_id, "client id")
        m = check_fields(msg, ADVERTISE, "public keys")
        get_round(m, self.round)
        c_pk, s_pk = get_bytes(m, "c_pk", KEY_BYTES), get_bytes(m, "s_pk", KEY_BYTES)
        if cid in self._c_pk:
            raise SecAggError(f"client {cid} already advertised keys")
        if not (check_public(c_pk) and check_public(s_pk)):
            raise SecAggCheat(cid, f"client {cid} advertised a public key of small order (every key agreement "
                                   "with it would fail)")
        used = set(self._c_pk.values()) | set(self._s_pk.values())
        if c_pk == s_pk or c_pk in used or s_pk in used:  # not proof of cheating: another may have copied it
            raise SecAggError(f"client {cid} advertised a public key already in use")
        self._c_pk[cid], self._s_pk[cid] = c_pk, s_pk

    def broadcast_keys(self) -> Message:
        """Close stage 0: the message for every client in ``advertised``."""
        self._at(Stage.ADVERTISE_KEYS, "broadcast_keys")
        ids = tuple(sorted(self._c_pk))
        if len(ids) < self.config.minimum:
            raise self._abort(f"{len(ids)} clients advertised keys, {self.config.minimum} needed")
        self.advertised = ids
        self._links = neighbours(ids, self._seed, self.config.num_shares)
        self.stage = Stage.SHARE_KEYS
        return {
            "round": self.round,
            "ids": ids_tensor(ids),
            "c_pks": blob_tensor(b"".join(self._c_pk[u] for u in ids)),
            "s_pks": blob_tensor(b"".join(self._s_pk[u] for u in ids)),
            "graph_seed": self._seed,
        }

    # --- stage 1: ShareKeys ------------------------------------------------------------

    def receive_shares(self, client_id: int, msg: Message) -> None:
        self._at(Stage.SHARE_KEYS, "shares")
        cid = self._member(client_id, self.advertised, "shares")
        m = check_fields(msg, SHARES, "shares")
        get_round(m, self.round)
        links = self._links[cid]
        receivers = get_ids(m, "receivers", max_count=len(links))
        if tuple(receivers) != links:
            raise SecAggError(f"client {cid} must send one share to each of its {len(links)} neighbours")
        sealed = _chunks(get_blob(m, "ciphertexts", SEALED_BYTES, len(receivers)), SEALED_BYTES)
        digests = _chunks(get_blob(m, "digests", DIGEST_PAIR, len(receivers)), DIGEST_PAIR)
        b_commit = get_bytes(m, "b_commit", KEY_BYTES)
        if cid in self._sealed:
            raise SecAggError(f"client {cid} already sent its shares")
        self._sealed[cid] = dict(zip(receivers, sealed))
        self._digests[cid] = dict(zip(receivers, digests))
        self._commit[cid] = b_commit

    def route_shares(self) -> dict[int, Message]:
        """Close stage 1: for each client in ``sharing``, the shares sealed to it.

        A client whose group kept fewer than ``threshold`` members could never have its
        secrets reconstructed: it is left out (and so, in turn, are its shares)."""
        self._at(Stage.SHARE_KEYS, "route_shares")
        u2 = set(self._sealed)
        while True:
            weak = {v for v in u2 if len(u2.intersection(self._links[v])) + 1 < self.config.threshold}
            if not weak:
                break
            u2 -= weak
        if len(u2) < self.config.minimum:
            raise self._abort(f"{len(u2)} clients shared keys, {self.config.minimum} needed")
        self.sharing = tuple(sorted(u2))
        out = {}
        for v in self.sharing:
            senders = [u for u in self._links[v] if u in u2]
            self._routed[v] = senders
            out[v] = {
                "round": self.round,
                "senders": ids_tensor(senders),
                "ciphertexts": blob_tensor(b"".join(self._sealed[u][v] for u in senders)),
                "digests": blob_tensor(b"".join(self._digests[u][v] for u in senders)),
            }
        self._sealed = {u: {} for u in self._sealed}  # routed: keep only who sent
        self._total = torch.zeros(self.config.length, dtype=torch.int64)
        self.stage = Stage.MASKED_INPUT
        return out

    # --- stage 2: MaskedInputCollection ------------------------------------------------

    def receive_masked(self, client_id: int, msg: Message) -> None:
        """Fold one masked input into the running sum (validated first)."""
        self._at(Stage.MASKED_INPUT, "masked input")
        cid = self._member(client_id, self.sharing, "masked input")
        m = check_fields(msg, MASKED, "masked input")
        get_round(m, self.round)
        y = get_ring(m, "masked", self.config.length, self.config.bits)
        if cid in self._masked:
            raise SecAggError(f"client {cid} already sent its masked input")
        assert self._total is not None
        self._total.add_(y).bitwise_and_(ring_mask(self.config.bits))
        self._masked.add(cid)

    def request_unmask(self) -> Message:
        """Close stage 2: the survivor list, for every client in ``survivors``. Aborts here,
        before anyone reveals a share, if some needed secret could not be reconstructed."""
        self._at(Stage.MASKED_INPUT, "request_unmask")
        u3 = self._masked
        if len(u3) < self.config.minimum:
            raise self._abort(f"{len(u3)} clients sent masked inputs, {self.config.minimum} needed")
        for u in self._needed(u3):
            holders = len(u3.intersection(group(self._links, u)))
            if holders < self.config.threshold:
                raise self._abort(f"client {u}'s secrets have {holders} holders left, {self.config.threshold} needed")
        self.survivors = tuple(sorted(u3))
        self.stage = Stage.UNMASKING
        return {"round": self.round, "survivors": ids_tensor(self.survivors)}

    def _needed(self, u3: set[int]) -> list[int]:
        """Survivors (their self masks) and dropped clients that masked with a survivor."""
        return [u for u in self.sharing if u in u3 or u3.intersection(self._links[u])]

    # --- stage 3: Unmasking ------------------------------------------------------------

    def receive_unmask(self, client_id: int, msg: Message) -> None:
        self._at(Stage.UNMASKING, "unmasking shares")
        cid = self._member(client_id, self.survivors, "unmasking shares")
        m = check_fields(msg, UNMASK, "unmasking shares")
        get_round(m, self.round)
        owners = sorted([*self._routed[cid], cid])
        alive = set(self.survivors)
        b_owners = get_ids(m, "b_owners", max_count=len(owners))
        sk_owners = get_ids(m, "sk_owners", max_count=len(owners))
        if cid not in b_owners or not set(b_owners) <= alive.intersection(owners) \
                or not set(sk_owners) <= set(owners) - alive:
            raise SecAggError(f"client {cid} must send its own b share, b shares of surviving and key shares of "
                              "dropped group members only")
        b_shares = _chunks(get_blob(m, "b_shares", SHARE_BYTES, len(b_owners)), SHARE_BYTES)
        sk_shares = _chunks(get_blob(m, "sk_shares", SHARE_BYTES, len(sk_owners)), SHARE_BYTES)
        if cid in self._answers:
            raise SecAggError(f"client {cid} already sent its unmasking shares")
        for which, owners_, shares_ in ((0, b_owners, b_shares), (1, sk_owners, sk_shares)):
            for u, share in zip(owners_, shares_):
                self._verify(cid, u, which, share)
        self._answers[cid] = (dict(zip(b_owners, b_shares)), dict(zip(sk_owners, sk_shares)))
        for u in set(owners) - set(b_owners) - set(sk_owners):  # shares it could not open
            self._unopened.setdefault(u, set()).add(cid)

    def _verify(self, holder: int, owner: int, which: int, share: bytes) -> None:
        """A revealed share against the digest its dealer sent with it (a holder's own share
        has none: a wrong one is the dealer's own fault, caught in ``finish``)."""
        if owner == holder:
            return
        digest = self._digests[owner][holder][which * KEY_BYTES:(which + 1) * KEY_BYTES]
        kind = (b"b", b"sk")[which]
        if share_digest(kind, self.round, owner, holder, share) != digest:
            what = ("self-mask seed", "mask key")[which]
            raise SecAggCheat(holder, f"client {holder} revealed a share of client {owner}'s {what} that is not "
                                      "the one dealt to it")

    def _reconstruct(self, owner: int, which: int, what: str) -> bytes:
        members = group(self._links, owner)
        shares = [
            (members.index(v) + 1, self._answers[v][which][owner])
            for v in sorted(self._answers) if owner in self._answers[v][which]
        ]
        if len(shares) < self.config.threshold:
            unopened = self._unopened.get(owner, set())
            why = f" ({len(unopened)} holder(s) could not open the shares it dealt)" if unopened else ""
            raise self._abort(f"{len(shares)} shares of client {owner}'s {what}, {self.config.threshold} needed{why}",
                              suspects=(owner,) if unopened else ())
        return shamir.reconstruct(shares, self.config.threshold)

    def finish(self) -> torch.Tensor:
        """Close stage 3: reconstruct, remove the masks, and return the ring sum (int64 in
        ``[0, 2^bits)``) of the inputs of ``survivors``: ``FixedPoint.decode(sum,
        len(survivors))`` turns it back into floats."""
        self._at(Stage.UNMASKING, "finish")
        self.responders = tuple(sorted(self._answers))
        if len(self.responders) < self.config.minimum:
            raise self._abort(f"{len(self.responders)} clients answered the unmasking request, {self.config.minimum} needed")
        u3 = set(self.survivors)
        self_keys, pairs = [], []
        for u in self._needed(u3):
            if u in u3:
                b = self._reconstruct(u, 0, "self-mask seed")
                if commit(b, self.round, u) != self._commit[u]:
                    raise self._abort(f"client {u}'s verified shares do not rebuild the self-mask seed it "
                                      "committed to (it dealt inconsistent shares)", (u,))
                self_keys.append(self_key(b, self.round, u))
            else:
                sk = private_key(self._reconstruct(u, 1, "mask key"))
                if public_bytes(sk) != self._s_pk[u]:
                    raise self._abort(f"client {u}'s verified shares do not rebuild the mask key of its public key "
                                      "(it dealt inconsistent shares)", (u,))
                pairs += [(pair_key(sk, self._s_pk[v], self.round, u, v), v, u) for v in self._links[u] if v in u3]
        assert self._total is not None
        total = remove_masks(self._total, self.config.bits, self_keys, pairs)
        self._total = None
        self.stage = Stage.DONE
        return total
