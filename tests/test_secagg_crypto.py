from __future__ import annotations

import pytest

from fl.secagg.crypto import (
    SEAL_OVERHEAD,
    agree,
    commit,
    context,
    derive,
    generate_keypair,
    open_sealed,
    private_bytes,
    private_key,
    public_bytes,
    seal,
)
from fl.secagg.errors import SecAggError


def test_agreement_is_symmetric_and_bound_to_its_context() -> None:
    (a, a_pk), (b, b_pk) = generate_keypair(), generate_keypair()
    info = context(b"share-key", 3, 1, 2)
    assert agree(a, b_pk, info) == agree(b, a_pk, info)
    assert len(agree(a, b_pk, info)) == 32
    assert agree(a, b_pk, info) != agree(a, b_pk, context(b"share-key", 4, 1, 2))
    assert agree(a, b_pk, info) != agree(a, b_pk, context(b"pair-mask", 3, 1, 2))


def test_small_order_peer_key_is_refused() -> None:
    sk, _ = generate_keypair()
    with pytest.raises(SecAggError, match="key agreement failed"):
        agree(sk, bytes(32), b"x")


def test_private_key_round_trips_through_bytes() -> None:
    sk, pk = generate_keypair()
    assert public_bytes(private_key(private_bytes(sk))) == pk


def test_seal_round_trip_and_overhead() -> None:
    key = derive(b"k" * 32, b"test")
    ad = context(b"share", 1, 5, 6)
    sealed = seal(key, b"p" * 64, ad)
    assert len(sealed) == 64 + SEAL_OVERHEAD
    assert open_sealed(key, sealed, ad) == b"p" * 64
    assert seal(key, b"p" * 64, ad) != sealed  # fresh nonce


def test_tampered_replayed_or_misaddressed_shares_are_refused() -> None:
    key = derive(b"k" * 32, b"test")
    sealed = seal(key, b"p" * 64, context(b"share", 1, 5, 6))
    for i in (0, 20, len(sealed) - 1):  # nonce, ciphertext, tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(SecAggError, match="authentication"):
            open_sealed(key, bytes(bad), context(b"share", 1, 5, 6))
    for ad in (context(b"share", 2, 5, 6), context(b"share", 1, 6, 5), context(b"share", 1, 5, 7)):
        with pytest.raises(SecAggError, match="authentication"):
            open_sealed(key, sealed, ad)
    with pytest.raises(SecAggError, match="authentication"):
        open_sealed(derive(b"j" * 32, b"test"), sealed, context(b"share", 1, 5, 6))
    with pytest.raises(SecAggError, match="too short"):
        open_sealed(key, sealed[:10], context(b"share", 1, 5, 6))


def test_commitment_binds_seed_round_and_client() -> None:
    c = commit(b"s" * 32, 1, 2)
    assert len(c) == 32 and c == commit(b"s" * 32, 1, 2)
    assert c not in {commit(b"t" * 32, 1, 2), commit(b"s" * 32, 2, 2), commit(b"s" * 32, 1, 3)}
