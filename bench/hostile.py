"""A federation under fire: does hostile traffic change the model, or the server's memory?

Runs the real ``server.py`` (``--rounds``, ``--min-clients`` = ``--clients``, a shared
secret) and that many honest ``client.py`` processes on 127.0.0.1, and meanwhile fires a
bounded number of hostile connections at the server from this process, paced over the run:

    garbage          random bytes
    http             an HTTP GET
    bad-header       right magic, wrong version / type / flags
    oversized        a header announcing up to 1 TiB (refused before allocation)
    malformed        a valid header and an undecodable payload
    hostile-pickle   a HELLO whose pickle would run ``touch <marker>`` (os.system / subprocess)
    half-frame       a header and part of its payload, then close
    wrong-secret     the real handshake with a wrong secret, under the honest clients' ids
    no-secret        the real handshake without a secret
    slowloris        a valid frame one byte every --slowloris-interval seconds (at most
                     --slowloris concurrently), until the server drops it

The server's VmRSS is sampled from /proc/<pid>/status every 0.2 s (and VmHWM, its peak,
just before it exits). Then the same honest federation (same seeds, same flags, fresh
checkpoint) runs undisturbed. Printed: both final accuracies and their difference in
percentage points (must be within --tolerance-pp), hostile attempts by kind, peak server
RSS of both runs, and last one JSON line with these figures. Exit status 1 if the
accuracies differ by more than the tolerance, the marker file appeared, or a run failed.

    python bench/hostile.py --data-dir ../shared/data/mnist
    python bench/hostile.py --limit 1000 --test-limit 500 --attacks 1000   # quicker
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol import MAGIC, VERSION, HEADER, Connection, MsgType, encode_header  # noqa: E402
from security import client_handshake  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
KINDS = ["garbage", "http", "bad-header", "oversized", "malformed", "hostile-pickle", "half-frame",
         "wrong-secret", "no-secret"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with the MNIST files")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--clients", type=int, default=3, help="honest clients (and --min-clients)")
    p.add_argument("--limit", type=int, default=4000, help="training samples per honest client")
    p.add_argument("--test-limit", type=int, default=2000, help="test images the server evaluates on")
    p.add_argument("--seed", type=int, default=0, help="seed of the server and the clients (same in both runs)")
    p.add_argument("--secret", default="bench-hostile-secret", help="the federation's shared secret")
    p.add_argument("--attacks", type=int, default=3000, help="hostile connections in all (slowloris not counted)")
    p.add_argument("--attack-rate", type=float, default=100.0, help="hostile connections per second, at most")
    p.add_argument("--attack-workers", type=int, default=4, help="threads firing hostile connections")
    p.add_argument("--max-attack-seconds", type=float, default=150.0, help="stop attacking after this long anyway")
    p.add_argument("--slowloris", type=int, default=16, help="slowloris connections held open at once")
    p.add_argument("--slowloris-interval", type=float, default=0.5, help="seconds between a slowloris' bytes")
    p.add_argument("--handshake-timeout", type=float, default=3.0, help="the server's --handshake-timeout")
    p.add_argument("--tolerance-pp", type=float, default=0.3, help="allowed accuracy difference, percentage points")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one federation may take")
    p.add_argument("--out", type=Path, default=None, help="folder for logs, checkpoints, metrics (default: a temp dir)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.attacks < 0 or args.attack_rate <= 0:
        p.error("--clients and --rounds must be >= 1, --attacks >= 0, --attack-rate > 0")
    return args


# --- memory ----------------------------------------------------------------------------------

def proc_status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssSampler(threading.Thread):
    """VmRSS every 0.2 s, and the last VmHWM seen (the kernel's own peak) while alive."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.hwm_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss = proc_status_kb(self.pid, "VmRSS")
            hwm = proc_status_kb(self.pid, "VmHWM")
            if rss is None:
                break
            self.samples.append(rss)
            self.hwm_kb = max(self.hwm_kb, hwm or 0)
            self.done.wait(0.2)

    def peak_mb(self) -> float:
        return max([self.hwm_kb, *self.samples], default=0) / 1024


# --- hostile traffic --------------------------------------------------------------------------

class Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class EvilSubprocess:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (subprocess.call, (["touch", self.path],))


def hostile_payloads(marker: Path) -> list[bytes]:
    import torch

    zipped = io.BytesIO()
    torch.save({"client_id": 0, "num_samples": 1, "options": {}, "x": Evil(f"touch {marker}")}, zipped)
    return [zipped.getvalue(),
            pickle.dumps({"client_id": 0, "x": Evil(f"touch {marker}")}, protocol=2),
            pickle.dumps(EvilSubprocess(str(marker)), protocol=5)]


class Attacker:
    def __init__(self, port: int, args: argparse.Namespace, marker: Path) -> None:
        self.port, self.args = port, args
        self.payloads = hostile_payloads(marker)
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # attempts the server did NOT refuse (should stay 0)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slowloris_s: list[float] = []  # how long each slowloris lasted before the server dropped it
        self.started = 0.0
        self.issued = 0
        self.unreached = 0

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    @staticmethod
    def _drain(s: socket.socket, seconds: float = 3.0) -> None:
        """Wait for the server to hang up (bounded)."""
        s.settimeout(seconds)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass

    def one(self, kind: str, rng: random.Random) -> None:
        if kind in ("wrong-secret", "no-secret"):
            conn = Connection(socket.create_connection(("127.0.0.1", self.port), timeout=5))
            try:
                secret = (b"guess-%d" % rng.randrange(10**9)) if kind == "wrong-secret" else None
                # under an honest client's id: a failed handshake must not displace it
                client_handshake(conn, rng.randrange(self.args.clients), 1000, {}, secret, timeout=5)
                with self.lock:
                    self.errors[kind] += 1  # admitted: must never happen
            except Exception:
                pass
            finally:
                conn.close()
            return
        s = self._connect()
        try:
            if kind == "garbage":
                data = rng.randbytes(rng.randrange(1, 4096))
                if data[:4] == MAGIC:
                    data = b"X" + data
                s.sendall(data)
            elif kind == "http":
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            elif kind == "bad-header":
                variant = rng.randrange(3)
                version, mtype, flags = (VERSION + 1 + rng.randrange(200), 1, 0) if variant == 0 else \
                    (VERSION, rng.choice([0, 9, 77, 255]), 0) if variant == 1 else (VERSION, 1, 0x8000)
                s.sendall(HEADER.pack(MAGIC, version, mtype, flags, 10))
            elif kind == "oversized":
                s.sendall(encode_header(rng.choice(list(MsgType)), rng.randrange(1 << 17, 1 << 40)))
            elif kind == "malformed":
                s.sendall(encode_header(MsgType.HELLO, 512) + rng.randbytes(512))
            elif kind == "hostile-pickle":
                raw = rng.choice(self.payloads)
                s.sendall(encode_header(MsgType.HELLO, len(raw)) + raw)
            elif kind == "half-frame":
                s.sendall(encode_header(MsgType.HELLO, 1000) + rng.randbytes(rng.randrange(1, 999)))
                return  # close mid-frame
            self._drain(s)
        except OSError:
            pass
        finally:
            s.close()

    def worker(self, index: int) -> None:
        rng = random.Random(1000 + index)
        while not self.stop.is_set():
            with self.lock:
                if self.issued >= self.args.attacks:
                    return
                n = self.issued
                self.issued += 1
            # pace: attempt n is not issued before started + n / rate
            delay = self.started + n / self.args.attack_rate - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            kind = KINDS[n % len(KINDS)]
            try:
                self.one(kind, rng)
            except ConnectionRefusedError:  # nothing listening (the run just ended): not an attempt
                with self.lock:
                    self.unreached += 1
                continue
            except OSError:
                pass  # turned away at --max-connections, or reset: still an attempt
            with self.lock:
                self.counts[kind] += 1

    def slowloris(self, index: int) -> None:
        rng = random.Random(5000 + index)
        frame = encode_header(MsgType.HELLO, 100) + bytes(100)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                s = self._connect()
            except OSError:
                self.stop.wait(0.5)
                continue
            with self.lock:
                self.counts["slowloris"] += 1
            try:
                for b in frame:
                    s.sendall(bytes([b]))
                    # wait until the next byte is due, but notice at once when the server hangs up
                    if select.select([s], [], [], self.args.slowloris_interval * (0.5 + rng.random()))[0]:
                        s.recv(1)
                        break  # EOF (or an ERROR frame): dropped by the server, as it should be
                    if self.stop.is_set():
                        break
            except OSError:
                pass  # reset by the server: dropped as well
            finally:
                s.close()
            with self.lock:
                if not self.stop.is_set():
                    self.slowloris_s.append(time.monotonic() - t0)

    def start(self) -> list[threading.Thread]:
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.args.attack_workers)]
        threads += [threading.Thread(target=self.slowloris, args=(i,), daemon=True) for i in range(self.args.slowloris)]
        for t in threads:
            t.start()
        return threads


# --- one federation ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {needle!r}; see {path}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {needle!r} in {path}")


def federation(args: argparse.Namespace, out: Path, attack: bool, marker: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", FL_SECRET=args.secret)
    env.pop("MNIST_DATA_DIR", None)
    common = ["--data-dir", str(args.data_dir), "--no-download", "--threads", "1", "--no-progress",
              "--seed", str(args.seed), "--port", str(port)]
    server_cmd = [sys.executable, str(REPO / "server.py"), *common, "--rounds", str(args.rounds),
                  "--min-clients", str(args.clients), "--test-limit", str(args.test_limit),
                  "--handshake-timeout", str(args.handshake_timeout),
                  "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.jsonl")]
    slog = out / "server.log"
    t0 = time.monotonic()
    server = subprocess.Popen(server_cmd, cwd=REPO, stdout=open(slog, "w"), stderr=subprocess.STDOUT, env=env)
    sampler = RssSampler(server.pid)
    sampler.start()
    clients: list[subprocess.Popen] = []
    attacker = None
    try:
        wait_for(slog, "listening on", server, 120)
        baseline = (proc_status_kb(server.pid, "VmRSS") or 0) / 1024
        if attack:
            attacker = Attacker(port, args, marker)
            attacker.start()
        for cid in range(args.clients):
            cmd = [sys.executable, str(REPO / "client.py"), *common, "--client-id", str(cid),
                   "--num-clients", str(args.clients), "--limit", str(args.limit)]
            clients.append(subprocess.Popen(cmd, cwd=REPO, stdout=open(out / f"client{cid}.log", "w"),
                                            stderr=subprocess.STDOUT, env=env))
        deadline = t0 + args.timeout
        while server.poll() is None and time.monotonic() < deadline:
            if attacker and time.monotonic() - attacker.started > args.max_attack_seconds:
                attacker.stop.set()
            # read VmHWM while the server still lives: once the last round is logged it exits
            time.sleep(0.2)
        if server.poll() is None:
            raise RuntimeError(f"the federation took over {args.timeout:.0f} s; see {out}")
    finally:
        if attacker:
            attacker.stop.set()
        sampler.done.set()
        for p in (server, *clients):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    sampler.join(timeout=2)
    wall = time.monotonic() - t0
    codes = [server.returncode, *(c.returncode for c in clients)]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (out / "metrics.jsonl").exists() else []
    text = slog.read_text(errors="replace")
    return {
        "codes": codes, "metrics": metrics, "wall_s": wall, "peak_rss_mb": sampler.peak_mb(), "baseline_rss_mb": baseline,
        "rss_samples": len(sampler.samples), "out": str(out),
        "counts": dict(attacker.counts) if attacker else {}, "admitted": dict(attacker.errors) if attacker else {},
        "unreached": attacker.unreached if attacker else 0,
        "slowloris_s": sorted(attacker.slowloris_s) if attacker else [],
        "refused_lines": len(re.findall(r"\b(refused|dropped connection)\b", text)),
        "tracebacks": text.count("Traceback"),
        "clients_per_round": [m["clients"] for m in metrics],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="flhostile-"))
    marker = out / "PWNED"
    print(f"hostile federation bench: {args.clients} clients x {args.limit} samples, {args.rounds} rounds, "
          f"test {args.test_limit}; {args.attacks} hostile connections at <= {args.attack_rate:g}/s "
          f"+ {args.slowloris} slowloris; logs in {out}", flush=True)
    attacked = federation(args, out / "attacked", True, marker)
    print(f"attacked run:    {attacked['wall_s']:.1f} s, exit codes {attacked['codes']}", flush=True)
    clean = federation(args, out / "undisturbed", False, marker)
    print(f"undisturbed run: {clean['wall_s']:.1f} s, exit codes {clean['codes']}", flush=True)

    ok_runs = all(c == 0 for c in attacked["codes"] + clean["codes"]) and \
        len(attacked["metrics"]) == len(clean["metrics"]) == args.rounds
    acc_a = attacked["metrics"][-1]["accuracy"] if attacked["metrics"] else float("nan")
    acc_c = clean["metrics"][-1]["accuracy"] if clean["metrics"] else float("nan")
    diff_pp = 100 * (acc_a - acc_c)
    counts = attacked["counts"]
    pwned = marker.exists()
    passed = ok_runs and abs(diff_pp) <= args.tolerance_pp and not pwned and not attacked["admitted"] \
        and attacked["tracebacks"] == 0
    print()
    print(f"  final accuracy, attacked     {100 * acc_a:.2f}%  (clients per round {attacked['clients_per_round']})")
    print(f"  final accuracy, undisturbed  {100 * acc_c:.2f}%  (clients per round {clean['clients_per_round']})")
    print(f"  difference                   {diff_pp:+.2f} pp (tolerance {args.tolerance_pp} pp)")
    print(f"  hostile attempts             {sum(counts.values())}: " +
          ", ".join(f"{k} {counts.get(k, 0)}" for k in [*KINDS, "slowloris"]) +
          (f" (+{attacked['unreached']} after the server had exited, not counted)" if attacked["unreached"] else ""))
    print(f"  server refusal log lines     {attacked['refused_lines']}; admitted attackers "
          f"{sum(attacked['admitted'].values())}; marker file created: {pwned}; tracebacks {attacked['tracebacks']}")
    lasted = attacked["slowloris_s"] or [0.0]
    print(f"  slowloris dropped after      median {statistics.median(lasted):.1f} s, max {lasted[-1]:.1f} s "
          f"(--handshake-timeout {args.handshake_timeout:g})")
    print(f"  peak server RSS              attacked {attacked['peak_rss_mb']:.0f} MB, "
          f"undisturbed {clean['peak_rss_mb']:.0f} MB (at start {attacked['baseline_rss_mb']:.0f} / "
          f"{clean['baseline_rss_mb']:.0f} MB)")
    print(f"  verdict                      {'PASS' if passed else 'FAIL'}")
    print(json.dumps({
        "bench": "hostile", "passed": passed, "accuracy_attacked": acc_a, "accuracy_undisturbed": acc_c,
        "diff_pp": round(diff_pp, 4), "tolerance_pp": args.tolerance_pp,
        "attempts": {k: counts.get(k, 0) for k in [*KINDS, "slowloris"]}, "attempts_total": sum(counts.values()),
        "admitted": sum(attacked["admitted"].values()), "marker_created": pwned,
        "refusal_log_lines": attacked["refused_lines"], "slowloris_median_s": round(statistics.median(lasted), 2),
        "slowloris_max_s": round(lasted[-1], 2),
        "peak_rss_mb_attacked": round(attacked["peak_rss_mb"], 1),
        "peak_rss_mb_undisturbed": round(clean["peak_rss_mb"], 1),
        "start_rss_mb_attacked": round(attacked["baseline_rss_mb"], 1),
        "start_rss_mb_undisturbed": round(clean["baseline_rss_mb"], 1),
        "wall_s_attacked": round(attacked["wall_s"], 1), "wall_s_undisturbed": round(clean["wall_s"], 1),
        "clients_per_round_attacked": attacked["clients_per_round"],
        "clients_per_round_undisturbed": clean["clients_per_round"],
        "rounds": args.rounds, "clients": args.clients, "limit": args.limit, "test_limit": args.test_limit,
        "seed": args.seed,
    }))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
