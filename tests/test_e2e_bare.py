"""The design card's usage as written: ``python server.py`` and several bare
``python client.py [--quantization]``, each given its own shard and id by the server.

Real processes on 127.0.0.1 and the server's own defaults; only the data folder, a free
port, the output files and small limits are added (``--test-limit``, a client's ``--limit``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from procs import expect_exit, expect_run, log_of, start, stop, wait_for_line

from fl.client.config import ClientConfig
from fl.client.participant import join
from fl.learning.config import Split
from fl.learning.data import load_mnist, split_shard, subset

LIMIT = 600  # samples each client trains on, of its shard
# "client 1 of 3: 600 samples (iid split, alpha 0.5, seed 0, from the server) on cpu"
SHARD_LINE = re.compile(r"client (\d+) of (\d+): (\d+) samples \((\w+) split, alpha ([0-9.e+-]+), seed (-?\d+)"
                        r"(, from the server)?\)")


def bare_server(tmp: Path, port: int, data: Path, *extra: object):
    return start("server.py", "--port", port, "--data-dir", data, "--no-download", "--test-limit", 500,
                 "--checkpoint", tmp / "ckpt.pt", "--metrics", tmp / "metrics.jsonl", "--no-progress", *extra,
                 log=tmp / "server.log")


def bare_client(tmp: Path, port: int, data: Path, name: str, *extra: object):
    log = tmp / f"{name}.log"
    return start("client.py", "--port", port, "--data-dir", data, "--no-download", "--limit", LIMIT,
                 "--no-progress", *extra, log=log), log


def shard_of(log: Path) -> tuple[int, Split, bool]:
    """The id and split a client.py process says it trains with, and whether the server gave them."""
    m = SHARD_LINE.search(log_of(log))
    assert m, log_of(log)[-2000:]
    cid, n, samples, scheme, alpha, seed, given = m.groups()
    assert int(samples) == LIMIT
    return int(cid), Split(int(n), scheme, float(alpha), int(seed)), given is not None


def metrics(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_three_bare_clients_get_disjoint_shards_from_a_server_with_its_defaults(tmp_path, mnist_dir, free_port):
    server = bare_server(tmp_path, free_port, mnist_dir)
    clients = [bare_client(tmp_path, free_port, mnist_dir, f"c{i}", *(["--quantization"] if i == 2 else []))
               for i in range(3)]
    expect_run(server, tmp_path / "server.log", clients)
    shards = {name: shard_of(log) for name, (_, log) in zip(("c0", "c1", "c2"), clients)}
    assert sorted(cid for cid, _, _ in shards.values()) == [0, 1, 2]
    assert {split for _, split, _ in shards.values()} == {Split(3, "iid", 0.5, 0)}  # the server's, for all
    assert all(given for _, _, given in shards.values())
    _, labels = load_mnist(mnist_dir, train=True, download=False)
    trained = [set(subset(split_shard(labels, split, cid), LIMIT, split.seed * 1009 + cid).tolist())
               for cid, split, _ in shards.values()]
    assert all(len(t) == LIMIT for t in trained)
    assert not (trained[0] & trained[1] or trained[0] & trained[2] or trained[1] & trained[2])
    rounds = metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]  # the server's default --rounds
    seen = {c["client_id"] for r in rounds for c in r["per_client"]}
    assert seen == {0, 1, 2}
    quantized = {c["client_id"] for r in rounds for c in r["per_client"] if c["quantized"]}
    assert quantized == {shards["c2"][0]}
    assert rounds[-1]["accuracy"] > 0.5, rounds[-1]  # chance is 0.1
    assert "reconnected" not in log_of(tmp_path / "server.log")  # no id was ever taken twice


def test_a_client_beyond_the_shards_is_told_so_and_an_explicit_id_still_works(tmp_path, mnist_dir, free_port):
    """Three shards given out (no sessions, so no round starts); a fourth bare client gets
    one line and exit 1; an id outside the shards too; explicit ids 0 and 1 run a round."""
    server = bare_server(tmp_path, free_port, mnist_dir, "--num-shards", 3, "--rounds", 1)
    procs = [server]
    try:
        wait_for_line(tmp_path / "server.log", "listening on", proc=server)
        config = ClientConfig(port=free_port, connect_timeout=30)
        assert [join(config, None)[0] for _ in range(3)] == [0, 1, 2]
        for name, extra, needle in [("fourth", (), "no free shard: all 3 shards of this server are taken"),
                                    ("outside", ("--client-id", 3), "client id 3 is outside this server's 3 shards")]:
            proc, log = bare_client(tmp_path, free_port, mnist_dir, name, *extra)
            procs.append(proc)
            expect_exit(proc, log, timeout=60, code=1)
            errors = [line for line in log_of(log).splitlines() if "ERROR" in line]
            assert len(errors) == 1 and needle in errors[0], log_of(log)
            assert "Traceback" not in log_of(log)
        explicit = [bare_client(tmp_path, free_port, mnist_dir, f"id{i}", "--client-id", i) for i in (0, 1)]
        procs += [p for p, _ in explicit]
        expect_exit(server, tmp_path / "server.log", timeout=120)
        for proc, log in explicit:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(*procs)
    assert [shard_of(log)[:2] for _, log in explicit] == [(0, Split(3)), (1, Split(3))]
    assert {c["client_id"] for c in metrics(tmp_path)[0]["per_client"]} == {0, 1}
    assert "a client that left can rejoin with --client-id 0" in log_of(tmp_path / "fourth.log")


def test_a_bare_client_keeps_its_shard_when_it_reconnects_to_a_restarted_server(tmp_path, mnist_dir, free_port):
    """The restarted server remembers nothing: the clients come back with the ids they were given."""
    server = bare_server(tmp_path, free_port, mnist_dir, "--rounds", 2, "--num-shards", 4)
    clients = [bare_client(tmp_path, free_port, mnist_dir, f"c{i}") for i in range(2)]
    procs = [server, *(p for p, _ in clients)]
    try:
        wait_for_line(tmp_path / "server.log", "round 1/2: accuracy", proc=server)
        stop(server)  # killed: the clients lose their connections and keep retrying
        for _, log in clients:
            wait_for_line(log, "lost the connection")
        server = bare_server(tmp_path, free_port, mnist_dir, "--rounds", 2, "--num-shards", 4, "--resume")
        procs.append(server)
        expect_exit(server, tmp_path / "server.log", timeout=120)
        for proc, log in clients:
            expect_exit(proc, log, timeout=30)
    finally:
        stop(*procs)
    ids = sorted(shard_of(log)[0] for _, log in clients)
    assert ids == [0, 1]
    restarted = log_of(tmp_path / "server.log")
    assert "assigned shard" not in restarted  # nobody asked again
    assert all(f"client {cid} joined" in restarted for cid in ids)
    assert {c["client_id"] for c in metrics(tmp_path)[-1]["per_client"]} == {0, 1}
