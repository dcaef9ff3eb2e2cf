"""Server ingest throughput against raw loopback TCP, and the server's memory during rounds.

Real side: the actual ``server.py`` runs as a subprocess (``--min-clients N``, ``--test-limit
100``, ``--threads 1``, checkpoint and metrics in a temporary folder). This process is the
load generator: N threads, each one TCP connection that does the real handshake
(``security.client_handshake`` over ``protocol.Connection``, no secret) and then answers
every MODEL frame at once with a float32 UPDATE encoded in advance by ``client.py``'s own
``update_message`` (one payload per round, a perturbed ImprovedCNN state; no training). The MODEL frames are read into a reused
buffer and not decoded (the round number is counted; the server's metrics confirm that
all N updates of every round were accepted).

Throughput is the server's own figure: per round, updates folded / ``round_s``, where
``round_s`` runs from the broadcast to the last update folded in. It therefore includes
the server SENDING N model-sized MODEL frames as well as receiving the N updates (its
handler threads, into two reusable buffers), decoding them (``torch.load(weights_only=True)``
on the ingest thread), validating and folding them; the previous round's evaluation and
checkpoint run in the server's background meanwhile.

Raw side, for fairness the same exchange without any of the federation logic: a plain
thread-per-connection TCP server in its own process (like ``socketserver``'s threads) that,
per round, sends each of N connections one message of the MODEL frame's length, then reads
and discards the UPDATE frame's length from each; its round time runs from the start of
those sends to the last byte read. The load generator is the same N threads replying with
the same bytes. Both sides: same N, byte counts, rounds, loopback, machine.

Trials alternate raw block / real block (ABBA...) in one invocation; the figures are medians
over rounds 2..R of all trials (round 1 includes warm-up). Target: real >= 0.5x raw.

Memory: the server's VmRSS is sampled every ~20 ms. The baseline is the median over ~0.3 s
once N-1 clients have joined (the N-th one starts round 1 at once); the peak is taken from
then until the first client hears DONE (all rounds evaluated and checkpointed, before the
server's shutdown). Target: peak - baseline <= 5x the float32 model (1.69 MB). The growth
of RssAnon (VmRSS less file-backed pages, i.e. less library code paged in on first use) is
reported beside it. The server's background evaluation of ``--test-limit`` images (one
batch) runs during the next round, so its activations (~0.2 MB per image) are in the peak.
Without MNIST in ``--data-dir`` the server gets a random stand-in test set.

    python bench/ingest.py                          # 50 clients, 6 rounds, 2 trials
    python bench/ingest.py --rounds 4 --trials 1 --profile
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # updates.py: an UPDATE body as client.py sends it

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
TARGET_RATIO = 0.5
TARGET_GROWTH = 5.0
NUM_SAMPLES = 1000


def rss_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, RssAnon) in MB: all resident memory, and that part not backed by files
    (RssFile is mostly library code paged in the first time a code path runs)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    found[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        return None
    return (found["VmRSS"], found.get("RssAnon", found["VmRSS"])) if "VmRSS" in found else None


def minor_faults(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10, minflt
    except (OSError, IndexError, ValueError):
        return None


def recv_into_exact(sock: socket.socket, view: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n], n - got)
        if k == 0:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        got += k


# --- raw loopback baseline ---------------------------------------------------------------

def raw_server_main(clients: int, rounds: int, model_bytes: int, update_bytes: int) -> None:
    """Thread per connection; per round: send model_bytes to all, read update_bytes from all."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(srv.getsockname()[1], flush=True)
    model_msg = os.urandom(model_bytes)
    go = [threading.Semaphore(0) for _ in range(clients)]
    done = threading.Semaphore(0)

    def handle(sock: socket.socket, me: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(update_bytes)
        view = memoryview(buf)
        for _ in range(rounds):
            go[me].acquire()
            sock.sendall(model_msg)
            recv_into_exact(sock, view, update_bytes)
            done.release()
        sock.close()

    threads = []
    for i in range(clients):
        conn, _ = srv.accept()
        t = threading.Thread(target=handle, args=(conn, i), daemon=True)
        t.start()
        threads.append(t)
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        for g in go:
            g.release()
        for _ in range(clients):
            done.acquire()
        times.append(time.monotonic() - t0)
    for t in threads:
        t.join()
    print(json.dumps({"round_s": times}), flush=True)


def run_raw(clients: int, rounds: int, model_bytes: int, update_bytes: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, __file__, "--_raw-server", str(clients), str(rounds),
                             str(model_bytes), str(update_bytes)], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    update_msg = os.urandom(update_bytes)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray(model_bytes)
            view = memoryview(buf)
            for _ in range(rounds):
                recv_into_exact(sock, view, model_bytes)
                sock.sendall(update_msg)
            sock.recv(1)
            sock.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    out = proc.stdout.readline()
    for t in threads:
        t.join(timeout=10)
    proc.wait(timeout=10)
    if errors or not out:
        raise SystemExit(f"raw baseline failed: {errors[:1]}")
    return json.loads(out)["round_s"]


# --- the real server ---------------------------------------------------------------------

def make_payloads(rounds: int) -> tuple[list[bytes], int]:
    """One UPDATE payload per round (index = round number) and the MODEL payload's length."""
    import torch
    from updates import update_message

    from fl.learning.model import ImprovedCNN
    from fl.wire.frames import encode_payload

    torch.manual_seed(0)
    state = ImprovedCNN().state_dict()
    g = torch.Generator().manual_seed(1)
    perturbed = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                 for k, v in state.items()}
    metrics = {"loss": 0.1, "accuracy": 0.9, "train_s": 1.0, "samples_per_s": 1000.0}
    payloads = [b""] + [encode_payload(update_message(perturbed, state, r, NUM_SAMPLES, metrics))
                        for r in range(1, rounds + 1)]
    config = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "augment": True, "hflip": False}
    model_len = len(encode_payload({"round": 1, "rounds": rounds, "state": state, "config": config}))
    return payloads, model_len


class Sampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float, float]] = []  # time, VmRSS, RssAnon
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            v = rss_mb(self.pid)
            if v is None:
                return
            self.samples.append((time.monotonic(), *v))
            time.sleep(self.period)


def wait_log(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120.0, count: int = 1) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = list(re.finditer(pattern, text))
        if len(found) >= count:
            return found[count - 1]
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{text[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} x{count} in {path}")


def run_server(a: argparse.Namespace, payloads: list[bytes]) -> dict:
    import torch

    from fl.learning.data import find_mnist_file, write_idx
    from fl.wire.frames import HEADER_SIZE, Connection, MsgType, decode_header, recv_exact
    from fl.wire.handshake import client_handshake

    tmp = Path(tempfile.mkdtemp(prefix="flbench-ingest-"))
    log_path = tmp / "server.log"
    data_dir = Path(a.data_dir)
    if not all(find_mnist_file(data_dir, stem) for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        data_dir = tmp / "data"  # the server only needs a test set: a random stand-in will do
        data_dir.mkdir()
        g = torch.Generator().manual_seed(0)
        write_idx(data_dir / "t10k-images-idx3-ubyte.gz", torch.randint(0, 256, (1000, 28, 28), generator=g, dtype=torch.uint8))
        write_idx(data_dir / "t10k-labels-idx1-ubyte.gz", torch.randint(0, 10, (1000,), generator=g, dtype=torch.uint8))
    cmd = [sys.executable, str(REPO / "server.py"), "--port", "0", "--rounds", a.rounds, "--min-clients", a.clients,
           "--round-timeout", 120, "--test-limit", a.test_limit, "--threads", a.server_threads, "--no-progress",
           "--no-download", "--data-dir", data_dir, "--checkpoint", tmp / "ckpt.pt", "--metrics", tmp / "metrics.jsonl"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FL_SECRET", None)
    env.update(kv.split("=", 1) for kv in a.server_env)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    sampler = Sampler(proc.pid)
    errors: list[BaseException] = []
    updates_sent = [0] * a.clients
    t_done: list[float] = []  # when the first client heard DONE: the rounds are over
    faults: list[int | None] = [None, None]  # the server's minor page faults over the rounds
    try:
        port = int(wait_log(log_path, r"listening on [^:]+:(\d+)", proc).group(1))
        sampler.start()

        def client(i: int, joined: threading.Event) -> None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Connection(sock)
                client_handshake(conn, i, NUM_SAMPLES, {}, None, timeout=30)
                joined.set()
                sock.settimeout(None)
                buf = bytearray(max(len(p) for p in payloads) * 2)
                view = memoryview(buf)
                round_num = 0
                while True:
                    msg_type, _, length = decode_header(bytes(recv_exact(sock, HEADER_SIZE)), 1 << 30)
                    if length > len(buf):
                        buf = bytearray(length)
                        view = memoryview(buf)
                    recv_into_exact(sock, view, length)
                    if msg_type != MsgType.MODEL:
                        if not t_done:
                            faults[1] = minor_faults(proc.pid)
                        t_done.append(time.monotonic())
                        break
                    round_num += 1
                    conn.send_payload(MsgType.UPDATE, payloads[round_num])
                    updates_sent[i] += 1
                sock.close()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                joined.set()

        threads, events = [], []
        for i in range(a.clients - 1):
            ev = threading.Event()
            t = threading.Thread(target=client, args=(i, ev), daemon=True)
            t.start()
            threads.append(t)
            events.append(ev)
        for ev in events:
            ev.wait(60)
        wait_log(log_path, r"client \d+ joined", proc, count=a.clients - 1)
        time.sleep(0.3)
        t_base = time.monotonic()
        time.sleep(0.3)
        baseline = statistics.median(v for t, v, _ in sampler.samples if t >= t_base)
        baseline_anon = statistics.median(an for t, _, an in sampler.samples if t >= t_base)
        t_peak_from = time.monotonic()
        faults[0] = minor_faults(proc.pid)
        last = threading.Thread(target=client, args=(a.clients - 1, threading.Event()), daemon=True)
        last.start()
        threads.append(last)
        proc.wait(timeout=300)
        for t in threads:
            t.join(timeout=10)
    finally:
        sampler.stopped.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if errors:
        raise SystemExit(f"load generator failed: {errors[0]!r}; server log {log_path}")
    metrics = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines() if line.strip()]
    t_end = min(t_done, default=float("inf"))
    peak = max(v for t, v, _ in sampler.samples if t_peak_from <= t <= t_end)
    peak_anon = max(an for t, _, an in sampler.samples if t_peak_from <= t <= t_end)
    (tmp / "rss.json").write_text(json.dumps({"t_last_join": t_peak_from, "t_done": t_end, "samples": sampler.samples}))
    n_faults = faults[1] - faults[0] if None not in faults else None
    return {"metrics": metrics, "baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline,
            "anon_growth_mb": peak_anon - baseline_anon,
            "faults_per_update": n_faults / max(1, len(metrics) * a.clients) if n_faults is not None else None,
            "samples": len(sampler.samples), "updates_sent": sum(updates_sent), "tmp": str(tmp)}


# --- a per-stage profile of the server's per-update path ----------------------------------

def profile(payload: bytes, reps: int) -> dict[str, float]:
    """The server's per-update stages (``Federation.submit`` for a flat float update), timed alone."""
    import torch

    from fl.common.layout import Layout
    from fl.learning.model import ImprovedCNN
    from fl.server.contribution import validate_flat
    from fl.strategies.base import MeanAggregator
    from fl.wire.frames import decode_payload

    layout = Layout.of(ImprovedCNN().state_dict())
    acc = MeanAggregator(layout.float_numel)
    t = {"decode_payload": 0.0, "unpack + validate_flat": 0.0, "MeanAggregator.add": 0.0}
    raw = bytearray(payload)  # what recv_exact hands over
    for _ in range(reps):
        t0 = time.perf_counter()
        body = decode_payload(raw)
        t1 = time.perf_counter()
        floats, ints = layout.unpack(body["flat"])
        validate_flat(floats)
        t2 = time.perf_counter()
        acc.add(floats, body["num_samples"])
        t3 = time.perf_counter()
        t["decode_payload"] += t1 - t0
        t["unpack + validate_flat"] += t2 - t1
        t["MeanAggregator.add"] += t3 - t2
    a, b = socket.socketpair()
    buf = bytearray(len(payload))
    view = memoryview(buf)
    t0 = time.perf_counter()
    sender = threading.Thread(target=lambda: [a.sendall(payload) for _ in range(reps)])
    sender.start()
    for _ in range(reps):
        recv_into_exact(b, view, len(payload))
    sender.join()
    t["loopback recv (socketpair)"] = time.perf_counter() - t0
    a.close(), b.close()
    torch.set_num_threads(torch.get_num_threads())
    return {k: 1000 * v / reps for k, v in t.items()}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--_raw-server":
        raw_server_main(*map(int, sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="MNIST folder for the server's test set")
    p.add_argument("--clients", type=int, default=50, help="concurrent connections (updates per round)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per trial (round 1 is left out of the medians)")
    p.add_argument("--trials", type=int, default=2, help="raw/real block pairs, alternated")
    p.add_argument("--server-threads", type=int, default=1, help="server.py --threads")
    p.add_argument("--test-limit", type=int, default=100,
                   help="server.py --test-limit: test images evaluated after each round (in the background, "
                        "during the next round: its activations, ~0.2 MB per image, count in the memory peak)")
    p.add_argument("--profile", action="store_true", help="also time the per-update stages in this process")
    p.add_argument("--keep", action="store_true", help="keep each server run's folder (log, metrics, RSS trace)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for server.py (experiments, e.g. MALLOC_ARENA_MAX=1)")
    a = p.parse_args()
    if a.rounds < 2:
        p.error("--rounds must be at least 2 (round 1 is warm-up)")

    import torch

    from fl.learning.model import ImprovedCNN
    from fl.wire.frames import HEADER_SIZE

    model_mb = sum(v.numel() * 4 for v in ImprovedCNN().state_dict().values()) / 1e6
    payloads, model_len = make_payloads(a.rounds)
    update_frame, model_frame = HEADER_SIZE + len(payloads[1]), HEADER_SIZE + model_len
    print(f"{a.clients} clients, {a.rounds} rounds x {a.trials} trials; UPDATE frame {update_frame} B, "
          f"MODEL frame {model_frame} B; float32 model {model_mb:.2f} MB; torch {torch.__version__}, "
          f"{os.cpu_count()} cores")
    raw_rounds: list[float] = []
    real_rounds: list[float] = []
    memory: list[dict] = []
    accepted_ok = True
    for trial in range(a.trials):
        order = ("raw", "real") if trial % 2 == 0 else ("real", "raw")
        for which in order:
            if which == "raw":
                times = run_raw(a.clients, a.rounds, model_frame, update_frame)
                ups = [a.clients / s for s in times[1:]]
                raw_rounds += ups
                print(f"  trial {trial + 1} raw : round_s {' '.join(f'{s:.3f}' for s in times)} -> "
                      f"median {statistics.median(ups):.0f} updates/s (rounds 2..{a.rounds})", flush=True)
            else:
                r = run_server(a, payloads)
                ms = r["metrics"]
                if len(ms) != a.rounds or any(m["clients"] != a.clients for m in ms):
                    accepted_ok = False
                    print(f"  WARNING: not all updates were folded: {[m['clients'] for m in ms]} (log in {r['tmp']})")
                ups = [m["clients"] / m["round_s"] for m in ms[1:]]
                real_rounds += ups
                memory.append({k: r[k] for k in ("baseline_mb", "peak_mb", "growth_mb", "anon_growth_mb")})
                if a.keep or not accepted_ok:
                    print(f"  server log, metrics and RSS trace kept in {r['tmp']}")
                else:
                    shutil.rmtree(r["tmp"], ignore_errors=True)
                fpu = r["faults_per_update"]
                rs = " ".join(f"{m['round_s']:.3f}" for m in ms)
                print(f"  trial {trial + 1} real: round_s {rs} -> "
                      f"median {statistics.median(ups):.0f} updates/s; RSS baseline {r['baseline_mb']:.1f} MB, "
                      f"peak {r['peak_mb']:.1f} MB, growth {r['growth_mb']:.1f} MB "
                      f"({r['growth_mb'] / model_mb:.1f}x model; anonymous memory alone "
                      f"{r['anon_growth_mb']:.1f} MB; {r['samples']} samples); "
                      f"{fpu if fpu is None else round(fpu)} minor page faults per update", flush=True)
    raw_ups, real_ups = statistics.median(raw_rounds), statistics.median(real_rounds)
    ratio = real_ups / raw_ups
    growth = max(m["growth_mb"] for m in memory)
    anon_growth = max(m["anon_growth_mb"] for m in memory)
    prof = None
    if a.profile:
        torch.set_num_threads(a.server_threads)
        prof = profile(payloads[1], 20)
        print("per-update stages in this process (ms):")
        for k, v in prof.items():
            print(f"  {k:<28} {v:7.2f}")
    print()
    print(f"raw loopback : {raw_ups:.0f} updates/s (server sends {a.clients} x {model_frame} B, "
          f"reads {a.clients} x {update_frame} B per round)")
    print(f"server ingest: {real_ups:.0f} updates/s (round_s: broadcast of {a.clients} MODEL frames to last fold)")
    print(f"ratio {ratio:.3f} (target >= {TARGET_RATIO}) {'OK' if ratio >= TARGET_RATIO else 'BELOW TARGET'}")
    print(f"memory growth (worst trial) {growth:.1f} MB = {growth / model_mb:.1f}x model "
          f"(target <= {TARGET_GROWTH}x = {TARGET_GROWTH * model_mb:.2f} MB) "
          f"{'OK' if growth <= TARGET_GROWTH * model_mb else 'ABOVE TARGET'}; "
          f"anonymous (non-file) memory alone {anon_growth:.1f} MB = {anon_growth / model_mb:.1f}x")
    print(json.dumps({"bench": "ingest", "clients": a.clients, "rounds": a.rounds, "trials": a.trials,
                      "update_frame_bytes": update_frame, "model_frame_bytes": model_frame,
                      "raw_updates_per_s": round(raw_ups, 1), "server_updates_per_s": round(real_ups, 1),
                      "ratio": round(ratio, 4), "target_ratio": TARGET_RATIO, "all_updates_folded": accepted_ok,
                      "model_mb": round(model_mb, 3), "memory": [{k: round(v, 2) for k, v in m.items()} for m in memory],
                      "growth_mb": round(growth, 2), "growth_x_model": round(growth / model_mb, 2),
                      "anon_growth_mb": round(anon_growth, 2), "anon_growth_x_model": round(anon_growth / model_mb, 2),
                      "target_growth_x": TARGET_GROWTH,
                      "profile_ms_per_update": {k: round(v, 3) for k, v in prof.items()} if prof else None}))


if __name__ == "__main__":
    main()
