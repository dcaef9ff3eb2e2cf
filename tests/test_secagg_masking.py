from __future__ import annotations

import os

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl.secagg.crypto import generate_keypair
from fl.secagg.graph import group, neighbours
from fl.secagg.masking import add_mask, mask_input, pair_key, pair_sign, remove_masks, self_key


def expand(seed: bytes, length: int, bits: int) -> torch.Tensor:
    """``PRG(seed)`` as the ring sees it: the mask ``add_mask`` adds to zeros."""
    return add_mask(torch.zeros(length, dtype=torch.int64), seed, 1, bits)


@pytest.mark.parametrize("bits", [8, 20, 32, 40, 62])
def test_prg_is_deterministic_uniform_and_in_range(bits: int) -> None:
    seed = os.urandom(32)
    v = expand(seed, 20000, bits)
    assert v.dtype == torch.int64 and v.shape == (20000,)
    assert torch.equal(v, expand(seed, 20000, bits))
    assert torch.equal(v[:100], expand(seed, 100, bits))  # a prefix of the same stream
    assert int(v.min()) >= 0 and int(v.max()) < 1 << bits
    assert abs(v.double().mean().item() / 2**bits - 0.5) < 0.02
    assert int(v.max()) >= (1 << bits) * 0.99  # the top of the ring is reached
    assert not torch.equal(v, expand(os.urandom(32), 20000, bits))
    assert expand(seed, 0, bits).shape == (0,)


@pytest.mark.parametrize("bits, width", [(32, 4), (24, 4), (48, 8)])
def test_prg_is_the_chacha20_keystream_read_little_endian(bits: int, width: int) -> None:
    seed = os.urandom(32)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(4) + b"fl-secagg-v1"), mode=None).encryptor().update(bytes(40 * width))
    words = [int.from_bytes(stream[i:i + width], "little") % (1 << bits) for i in range(0, len(stream), width)]
    assert expand(seed, 40, bits).tolist() == words


def test_add_then_subtract_a_mask_is_the_identity() -> None:
    x = torch.randint(0, 1 << 32, (1000,))
    seed = os.urandom(32)
    y = add_mask(x.clone(), seed, 1, 32)
    assert not torch.equal(x, y) and int(y.min()) >= 0 and int(y.max()) < 1 << 32
    assert torch.equal(add_mask(y, seed, -1, 32), x)


def _keys(n: int) -> dict[int, tuple]:
    return {u: generate_keypair() for u in range(n)}


@pytest.mark.parametrize("bits", [32, 48])
def test_pairwise_masks_cancel_exactly(bits: int) -> None:
    n, length, rnd = 5, 3000, 7
    keys = _keys(n)
    xs = {u: torch.randint(0, 1 << bits, (length,)) for u in range(n)}
    seeds = {u: os.urandom(32) for u in range(n)}
    total = torch.zeros(length, dtype=torch.int64)
    for u in range(n):
        pairs = {v: pair_key(keys[u][0], keys[v][1], rnd, u, v) for v in range(n) if v != u}
        y = mask_input(xs[u], bits, self_key(seeds[u], rnd, u), pairs, u)
        assert not torch.equal(y, xs[u])
        total = (total + y) & ((1 << bits) - 1)
    remove_masks(total, bits, [self_key(seeds[u], rnd, u) for u in range(n)], [])
    assert torch.equal(total, sum(xs.values()) & ((1 << bits) - 1))


def test_dropped_clients_masks_are_removed_with_its_key() -> None:
    n, length, rnd, bits = 4, 500, 1, 32
    keys = _keys(n)
    xs = {u: torch.randint(0, 1 << bits, (length,)) for u in range(n)}
    seeds = {u: os.urandom(32) for u in range(n)}
    survivors, dropped = [0, 2, 3], 1
    total = torch.zeros(length, dtype=torch.int64)
    for u in survivors:  # everyone masked with everyone, but 1's input never arrives
        pairs = {v: pair_key(keys[u][0], keys[v][1], rnd, u, v) for v in range(n) if v != u}
        total = (total + mask_input(xs[u], bits, self_key(seeds[u], rnd, u), pairs, u)) & 0xFFFFFFFF
    dropped_pairs = [(pair_key(keys[dropped][0], keys[v][1], rnd, dropped, v), v, dropped) for v in survivors]
    remove_masks(total, bits, [self_key(seeds[u], rnd, u) for u in survivors], dropped_pairs)
    assert torch.equal(total, sum(xs[u] for u in survivors) & 0xFFFFFFFF)


def test_pair_keys_are_symmetric_and_signs_opposite() -> None:
    (a, a_pk), (b, b_pk) = generate_keypair(), generate_keypair()
    assert pair_key(a, b_pk, 1, 3, 9) == pair_key(b, a_pk, 1, 9, 3)
    assert pair_key(a, b_pk, 1, 3, 9) != pair_key(a, b_pk, 2, 3, 9)
    assert pair_sign(3, 9) == -pair_sign(9, 3) == 1
    assert self_key(b"s" * 32, 1, 3) != self_key(b"s" * 32, 1, 4)


def test_complete_graph_without_num_shares() -> None:
    links = neighbours([5, 1, 3], b"s" * 32, None)
    assert links == {1: (3, 5), 3: (1, 5), 5: (1, 3)}
    assert group(links, 3) == (1, 3, 5)
    assert neighbours([1, 3, 5], b"s" * 32, 7) == links  # a group as big as everyone


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    ids = list(range(0, 40, 2))
    links = neighbours(ids, b"a" * 32, 5)
    assert set(links) == set(ids)
    for u, vs in links.items():
        assert len(vs) == 4 and u not in vs and list(vs) == sorted(vs)
        assert all(u in links[v] for v in vs)
    assert links == neighbours(list(reversed(ids)), b"a" * 32, 5)
    assert links != neighbours(ids, b"b" * 32, 5)
    with pytest.raises(ValueError, match="odd"):
        neighbours(ids, b"a" * 32, 4)
    with pytest.raises(ValueError, match="distinct"):
        neighbours([1, 1, 2], b"a" * 32, 3)
