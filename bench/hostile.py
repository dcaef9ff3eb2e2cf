"""A federation under fire: does hostile traffic change the model, or the server's memory?

Runs the real ``server.py`` (``--rounds``, ``--min-clients`` = ``--clients``, a shared
secret, TLS unless ``--no-tls``) and that many honest ``client.py`` processes on
127.0.0.1, and meanwhile attacks it from this process, from another loopback address
(``--attacker-address``, 127.0.0.2, so that per-address limits are what protects the
honest clients). Outsiders (no secret), a bounded number of connections paced over the run:

    garbage          random bytes
    http             an HTTP GET
    bad-header       right magic, wrong version / type / flags
    oversized        a header announcing up to 1 TiB (refused before allocation)
    malformed        a valid header and an undecodable payload
    hostile-pickle   a HELLO whose pickle would run ``touch <marker>`` (os.system / subprocess)
    half-frame       a header and part of its payload, then close
    wrong-secret     the real handshake with a wrong secret, under the honest clients' ids
    no-secret        the real handshake without a secret
    bytearray-hello  a HELLO zip whose pickle is bytearray(1 << 30)
    deflate-hello    a HELLO zip with a DEFLATE record that inflates 1000x
    counter-hello    a HELLO pickle of Counter(bytearray(2e8))
    nested-error     an ERROR nested 2,000 deep
    escape-error     an ERROR whose reason forges a log line with terminal escapes
    slowloris        a valid frame one byte every --slowloris-interval seconds (at most
                     --slowloris concurrently), until the server drops it
    idle             --idle silent sockets held open (reopened once a second when dropped)

and participants that hold the secret (``--no-participants`` leaves them out), rejoining
whenever they are dropped, each round: one update scaled by 1e6 / every value 3e38
claiming 1 sample / an 8-bit delta with scale 1e30 (in turn; one norm outlier a round);
an all-zero model claiming 10^7 samples / BatchNorm variances of -1000 / a NaN tensor
behind shadowed attributes (in turn); a 16.8 MB undecodable UPDATE; a 1 MB UPDATE with a
compressed record; --stallers headers announcing 64 MiB, held --stall-seconds; the
server's MODEL frame reflected back; and ghosts that hang up, send an ERROR with escape
codes or nested 2,000 deep, or a frame of the wrong type. The server runs with
``--max-frame-mb 70`` in both runs so that the big frames reach the decoder.

The server's VmRSS is sampled from /proc/<pid>/status every 0.2 s (and VmHWM, its peak,
just before it exits). Then the same honest federation (same seeds, same flags, fresh
checkpoint) runs undisturbed. Printed: both final accuracies and their difference in
percentage points (must be within --tolerance-pp), attempts by kind, admitted attackers
(an outsider through the handshake, or a participant's update in an aggregate: must be
0), peak server RSS and log lines of both runs, and last one JSON line with these
figures. Exit status 1 if the accuracies differ by more than the tolerance, anything was
admitted, the marker file appeared, or a run failed.

``--zero-model CLAIM ...`` measures instead the known gap of the norm screen: one
participant sends an all-zero model every round, claiming CLAIM samples (<= --max-samples,
so plausible), under ``--weighting samples`` for each claim and once under ``uniform``;
no other attack. Printed: the accuracy per round of each run against the undisturbed one.

    python bench/hostile.py --data-dir ../shared/data/mnist
    python bench/hostile.py --limit 1000 --test-limit 500 --attacks 1000   # quicker
    python bench/hostile.py --zero-model 4000 60000
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
sys.path.insert(0, str(REPO / "tests"))  # attacks.py: the crafted frames the attack tests send too

import attacks as A  # noqa: E402

from fl.wire.errors import ConnectionClosed  # noqa: E402
from fl.wire.frames import HEADER, MAGIC, VERSION, Connection, MsgType, encode_header, encode_payload  # noqa: E402
from fl.wire.handshake import client_handshake  # noqa: E402
from fl.wire.tls import client_tls_context  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
KINDS = ["garbage", "http", "bad-header", "oversized", "malformed", "hostile-pickle", "half-frame",
         "wrong-secret", "no-secret", "bytearray-hello", "deflate-hello", "counter-hello", "nested-error",
         "escape-error"]
PARTICIPANT_KINDS = ["poison", "corrupt", "undecodable-16MB", "compressed-record", "announce-64MiB",
                     "reflect", "ghost"]
ATTACKER_ID = 100  # participants' ids start here (the honest clients are 0..--clients-1)


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
    p.add_argument("--round-timeout", type=float, default=120.0, help="the server's --round-timeout")
    p.add_argument("--max-frame-mb", type=int, default=70, help="the server's --max-frame-mb (both runs)")
    p.add_argument("--attacker-address", default="127.0.0.2", help="loopback address the attacks come from")
    p.add_argument("--no-tls", action="store_true", help="plain TCP (default: TLS with a self-signed certificate)")
    p.add_argument("--idle", type=int, default=140, help="silent sockets held open by an outsider")
    p.add_argument("--no-participants", action="store_true", help="no attacks by holders of the secret")
    p.add_argument("--stallers", type=int, default=16, help="participants announcing 64 MiB and stalling, a round")
    p.add_argument("--stall-seconds", type=float, default=3.0, help="how long a staller holds its header")
    p.add_argument("--zero-model", type=int, nargs="+", default=None, metavar="CLAIM",
                   help="measure an all-zero model claiming CLAIM samples (weighting samples, then uniform)")
    p.add_argument("--tolerance-pp", type=float, default=0.3, help="allowed accuracy difference, percentage points")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one federation may take")
    p.add_argument("--out", type=Path, default=None, help="folder for logs, checkpoints, metrics (default: a temp dir)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.attacks < 0 or args.attack_rate <= 0:
        p.error("--clients and --rounds must be >= 1, --attacks >= 0, --attack-rate > 0")
    if not args.attacker_address.startswith("127."):
        p.error("--attacker-address must be a loopback address (127.x.x.x)")
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
    def __init__(self, port: int, args: argparse.Namespace, marker: Path, tls) -> None:
        self.port, self.args, self.tls = port, args, tls
        self.payloads = hostile_payloads(marker)
        self.bombs = {"bytearray-hello": A.frame(MsgType.HELLO, A.bytearray_hello()),
                      "deflate-hello": A.frame(MsgType.HELLO, A.deflate_hello()),
                      "counter-hello": A.frame(MsgType.HELLO, A.counter_hello()),
                      "nested-error": A.frame(MsgType.ERROR, A.nested_error()),
                      "escape-error": A.frame(MsgType.ERROR, A.escape_error())}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # attempts the server did NOT refuse (should stay 0)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slowloris_s: list[float] = []  # how long each slowloris lasted before the server dropped it
        self.idle_s: list[float] = []  # how long each idle socket was held before the server dropped it
        self.started = 0.0
        self.issued = 0
        self.unreached = 0

    def _connect(self, offset: int = 0) -> socket.socket:
        """Slowloris and idle sockets come from --attacker-address, the paced attacks from the next one."""
        return A.connect(self.port, shifted(self.args.attacker_address, offset), self.tls, timeout=5)

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
            conn = Connection(self._connect(1))
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
        s = self._connect(1)
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
            elif kind in self.bombs:
                s.sendall(self.bombs[kind])
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

    def idle(self) -> None:
        """Hold --idle silent sockets; reopen those the server dropped, once a second."""
        socks: dict[socket.socket, float] = {}
        refill = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= refill:
                refill = time.monotonic() + 1.0
                while len(socks) < self.args.idle:
                    try:
                        s = socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                                     source_address=(self.args.attacker_address, 0))
                    except OSError:
                        break
                    socks[s] = time.monotonic()
                    with self.lock:
                        self.counts["idle"] += 1
            ready = select.select(list(socks), [], [], 0.2)[0] if socks else []
            if not socks:
                self.stop.wait(0.2)
            for s in ready:
                try:
                    data = s.recv(1024)
                except OSError:
                    data = b""
                if not data:
                    held = time.monotonic() - socks.pop(s)
                    s.close()
                    with self.lock:
                        self.idle_s.append(held)
        for s in socks:
            s.close()

    def start(self) -> list[threading.Thread]:
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.args.attack_workers)]
        threads += [threading.Thread(target=self.slowloris, args=(i,), daemon=True) for i in range(self.args.slowloris)]
        if self.args.idle:
            threads.append(threading.Thread(target=self.idle, daemon=True))
        for t in threads:
            t.start()
        return threads


def shifted(address: str, offset: int) -> str:
    """127.0.0.2 shifted by 1 is 127.0.0.3 (the attackers' loopback addresses)."""
    parts = address.split(".")
    return ".".join([*parts[:3], str((int(parts[3]) + offset - 1) % 254 + 1)])


class Participants:
    """Attackers that hold the secret: each joins as a participant, acts on every MODEL it is
    sent, and rejoins when dropped (after the round it was dropped in)."""

    def __init__(self, port: int, args: argparse.Namespace, tls) -> None:
        self.port, self.args, self.tls = port, args, tls
        self.secret = args.secret.encode()
        self.source = shifted(args.attacker_address, 2)
        self.counts: Counter[str] = Counter()
        self.joined: set[int] = set()
        self.outcomes: Counter[str] = Counter()  # how the server answered: refused and kept, or dropped
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.bomb = A.many_objects_payload(16_800_000)
        self.zipped = A.compressed_record_payload(1_000_000)

    def _loop(self, cid: int, kind: str, act) -> None:
        """Join, serve MODELs with ``act(conn, msg)``, rejoin when dropped, until stopped."""
        while not self.stop.is_set():
            try:
                conn = A.join(self.port, cid, self.secret, num_samples=self.args.limit, source=self.source,
                              tls=self.tls, options={"quantization": kind == "ghost"})
            except Exception:  # noqa: BLE001 - the server is gone, or busy: try again shortly
                self.stop.wait(1.0)
                continue
            with self.lock:
                self.joined.add(cid)
            acted = False
            try:
                while not self.stop.is_set():
                    msg = conn.recv({MsgType.MODEL, MsgType.DONE}, timeout=self.args.timeout)
                    if acted:  # the server answered the last attempt with the next message: kept us
                        with self.lock:
                            self.outcomes[f"{kind}: session kept"] += 1
                    if msg.type == MsgType.DONE:
                        self.stop.wait(1.0)
                        break
                    with self.lock:
                        self.counts[kind] += 1
                    act(conn, msg)
                    acted = True
            except Exception as exc:  # noqa: BLE001 - dropped by the server: as it should be
                with self.lock:
                    self.outcomes[f"{kind}: dropped ({type(exc).__name__})"] += 1
            finally:
                conn.close()
            self.stop.wait(0.5)

    # what each participant sends
    def poison(self, conn, msg) -> None:
        r, base = msg.body["round"], msg.body["state"]
        if r % 3 == 1:
            body = A.update_body(r, self.args.limit, A.scaled_state(base, 1e6, seed=r))
        elif r % 3 == 2:
            body = A.update_body(r, 1, A.constant_state(base, 3e38))
        else:
            body = {**A.update_body(r, self.args.limit, {}), "quantized": True,
                    "delta": A.quantized_scale_delta(base, 1e30, seed=r)}
            del body["state"]
        conn.send(MsgType.UPDATE, body, timeout=60)

    def corrupt(self, conn, msg) -> None:
        r, base = msg.body["round"], msg.body["state"]
        if r % 3 == 1:
            conn.send(MsgType.UPDATE, A.update_body(r, 10**7, A.constant_state(base, 0.0)), timeout=60)
        elif r % 3 == 2:
            conn.send(MsgType.UPDATE, A.update_body(r, self.args.limit, A.negative_variance_state(base)), timeout=60)
        else:
            conn.send_payload(MsgType.UPDATE, A.shadowed_nan_payload(r, base), timeout=60)

    def undecodable(self, conn, msg) -> None:
        conn.send_payload(MsgType.UPDATE, self.bomb, timeout=60)

    def compressed(self, conn, msg) -> None:
        conn.send_payload(MsgType.UPDATE, self.zipped, timeout=60)

    def stall(self, conn, msg) -> None:
        A.send_header_only(conn, MsgType.UPDATE, 64 << 20)
        self.stop.wait(self.args.stall_seconds)
        raise ConnectionClosed("the staller hangs up")

    def reflect(self, conn, msg) -> None:
        raise AssertionError("served by reflector()")

    def ghost_plans(self):
        def say(payload: bytes, msg_type: MsgType = MsgType.ERROR):
            def act(conn, msg) -> None:
                conn.send_payload(msg_type, payload, timeout=10)
                A.closed_within(conn.sock, 10)
                raise ConnectionClosed("said its piece")
            return act

        def vanish(conn, msg) -> None:
            raise ConnectionClosed("vanished mid-round")

        return [say(A.escape_error()), say(A.nested_error()), say(encode_payload({"client_id": 0}), MsgType.HELLO),
                vanish]

    def reflector(self, cid: int) -> None:
        while not self.stop.is_set():
            try:
                conn = A.join(self.port, cid, self.secret, num_samples=self.args.limit, source=self.source,
                              tls=self.tls)
            except Exception:  # noqa: BLE001
                self.stop.wait(1.0)
                continue
            try:
                raw = A.recv_raw_frame(conn, timeout=self.args.timeout)
                if raw[5] == MsgType.DONE:
                    self.stop.wait(1.0)
                    continue
                with self.lock:
                    self.counts["reflect"] += 1
                conn.sock.sendall(raw)
                dropped = A.closed_within(conn.sock, 30) is not None
                with self.lock:
                    self.outcomes["reflect: dropped" if dropped else "reflect: kept"] += 1
            except Exception:  # noqa: BLE001
                pass
            finally:
                conn.close()
            self.stop.wait(0.5)

    EARLY = 2  # the poisoners join first and count towards --min-clients, so round 1 has them too

    def start_early(self) -> None:
        """The two poisoners, before the honest clients (the server waits for them)."""
        for job in ((ATTACKER_ID, "poison", self.poison), (ATTACKER_ID + 1, "corrupt", self.corrupt)):
            threading.Thread(target=self._loop, args=job, daemon=True).start()
        end = time.monotonic() + 30
        while sum(self.counts.values()) == 0 and len(self.joined) < self.EARLY and time.monotonic() < end:
            time.sleep(0.1)

    def start(self) -> None:
        """The others, once the honest clients have joined: they are sampled from round 2 on
        (had they come first, they alone could have made up --min-clients)."""
        cid = iter(range(ATTACKER_ID + self.EARLY, ATTACKER_ID + 100))
        jobs = [(next(cid), "undecodable-16MB", self.undecodable), (next(cid), "compressed-record", self.compressed)]
        jobs += [(next(cid), "announce-64MiB", self.stall) for _ in range(self.args.stallers)]
        jobs += [(next(cid), "ghost", act) for act in self.ghost_plans()]
        threads = [threading.Thread(target=self._loop, args=job, daemon=True) for job in jobs]
        threads.append(threading.Thread(target=self.reflector, args=(next(cid),), daemon=True))
        for t in threads:
            t.start()


class ZeroModel(Participants):
    """One participant that sends an all-zero model every round, claiming ``claim`` samples."""

    def __init__(self, port: int, args: argparse.Namespace, tls, claim: int) -> None:
        super().__init__(port, args, tls)
        self.claim = claim

    def zero(self, conn, msg) -> None:
        r, base = msg.body["round"], msg.body["state"]
        conn.send(MsgType.UPDATE, A.update_body(r, self.claim, A.constant_state(base, 0.0)), timeout=60)

    def _loop_zero(self, conn) -> None:
        try:
            while not self.stop.is_set():
                msg = conn.recv({MsgType.MODEL, MsgType.DONE}, timeout=self.args.timeout)
                if msg.type == MsgType.DONE:
                    return
                self.counts["zero-model"] += 1
                self.zero(conn, msg)
        finally:
            conn.close()

    EARLY = 1

    def start_early(self) -> None:
        conn = A.join(self.port, ATTACKER_ID, self.secret, num_samples=self.claim, source=self.source, tls=self.tls)
        threading.Thread(target=self._loop_zero, args=(conn,), daemon=True).start()

    def start(self) -> None:
        pass


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


def make_tls(out: Path) -> tuple[list[str], list[str], object]:
    """Server flags, client flags and the attackers' context for TLS ([], [], None without)."""
    cert, key = A.make_cert(out / "tls")
    return ["--tls-cert", str(cert), "--tls-key", str(key)], ["--tls-ca", str(cert)], client_tls_context(str(cert))


def federation(args: argparse.Namespace, out: Path, attack: bool, marker: Path, tls: tuple = ([], [], None),
               weighting: str = "samples", zero_claim: int | None = None) -> dict:
    """One federation; ``attack``: outsiders and (unless --no-participants) participants attack
    it; ``zero_claim``: only the zero-model participant does."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", FL_SECRET=args.secret)
    env.pop("MNIST_DATA_DIR", None)
    common = ["--data-dir", str(args.data_dir), "--no-download", "--threads", "1", "--no-progress",
              "--seed", str(args.seed), "--port", str(port)]
    early = ZeroModel.EARLY if zero_claim is not None else Participants.EARLY if attack and not args.no_participants \
        else 0
    server_cmd = [sys.executable, str(REPO / "server.py"), *common, "--rounds", str(args.rounds),
                  "--min-clients", str(args.clients + early), "--test-limit", str(args.test_limit),
                  "--handshake-timeout", str(args.handshake_timeout), "--round-timeout", str(args.round_timeout),
                  "--max-frame-mb", str(args.max_frame_mb), "--weighting", weighting, *tls[0],
                  "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.jsonl"),
                  "--overwrite"]  # a re-run with the same --out replaces its runs
    slog = out / "server.log"
    t0 = time.monotonic()
    server = subprocess.Popen(server_cmd, cwd=REPO, stdout=open(slog, "w"), stderr=subprocess.STDOUT, env=env)
    sampler = RssSampler(server.pid)
    sampler.start()
    clients: list[subprocess.Popen] = []
    attacker = participants = None
    try:
        wait_for(slog, "listening on", server, 120)
        baseline = (proc_status_kb(server.pid, "VmRSS") or 0) / 1024
        if zero_claim is not None:
            participants = ZeroModel(port, args, tls[2], zero_claim)
        elif attack and not args.no_participants:
            participants = Participants(port, args, tls[2])
        if participants:
            participants.start_early()
        for cid in range(args.clients):
            cmd = [sys.executable, str(REPO / "client.py"), *common, "--client-id", str(cid),
                   "--num-clients", str(args.clients), "--limit", str(args.limit), *tls[1]]
            clients.append(subprocess.Popen(cmd, cwd=REPO, stdout=open(out / f"client{cid}.log", "w"),
                                            stderr=subprocess.STDOUT, env=env))
        for cid in range(args.clients):  # the honest clients are in; now the rest of the attack
            wait_for(slog, f"client {cid} joined", server, 180)
        if attack:
            attacker = Attacker(port, args, marker, tls[2])
            attacker.start()
        if participants:
            participants.start()
        deadline = t0 + args.timeout
        while server.poll() is None and time.monotonic() < deadline:
            if attacker and time.monotonic() - attacker.started > args.max_attack_seconds:
                attacker.stop.set()
            # read VmHWM while the server still lives: once the last round is logged it exits
            time.sleep(0.2)
        if server.poll() is None:
            raise RuntimeError(f"the federation took over {args.timeout:.0f} s; see {out}")
    finally:
        for a in (attacker, participants):
            if a:
                a.stop.set()
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
    counts = Counter(attacker.counts) if attacker else Counter()
    if participants:
        counts.update(participants.counts)
    refused = sum(int(n) for n in re.findall(r"refused (\d+) connection\(s\)", text))
    return {
        "codes": codes, "metrics": metrics, "wall_s": wall, "peak_rss_mb": sampler.peak_mb(), "baseline_rss_mb": baseline,
        "rss_samples": len(sampler.samples), "out": str(out), "counts": dict(counts),
        # admitted: an outsider through the handshake, or a participant's update in an aggregate
        "admitted": {**(dict(attacker.errors) if attacker else {}),
                     **({"participant updates aggregated": n} if (n := sum(
                         1 for m in metrics for c in m["per_client"] if c["client_id"] >= ATTACKER_ID)) else {})},
        "outcomes": dict(participants.outcomes) if participants else {},
        "unreached": attacker.unreached if attacker else 0,
        "slowloris_s": sorted(attacker.slowloris_s) if attacker else [],
        "idle_s": sorted(attacker.idle_s) if attacker else [],
        "refused_connections": refused,
        "refused_lines": len(re.findall(r"\brefused \d+ connection", text)),
        "log_lines": len(text.splitlines()),
        "rejected_updates": sum(len(m.get("rejected", [])) for m in metrics),
        "escape_bytes_in_log": text.count("\x1b"),
        "tracebacks": text.count("Traceback"),
        "clients_per_round": [m["clients"] for m in metrics],
        "round_s": [round(m["round_s"], 1) for m in metrics],
    }


def zero_model(args: argparse.Namespace, out: Path, tls: tuple) -> int:
    """The norm screen's known gap: an all-zero model with a plausible sample claim."""
    marker = out / "PWNED"
    runs = {"undisturbed": federation(args, out / "undisturbed", False, marker, tls)}
    for claim in args.zero_model:
        runs[f"zero model, {claim} samples, --weighting samples"] = federation(
            args, out / f"zero-samples-{claim}", False, marker, tls, "samples", claim)
    runs["zero model, --weighting uniform"] = federation(args, out / "zero-uniform", False, marker, tls, "uniform",
                                                         args.zero_model[0])
    print()
    figures = {}
    for name, run in runs.items():
        acc = [round(100 * m["accuracy"], 2) for m in run["metrics"]]
        accepted = [sum(1 for c in m["per_client"] if c["client_id"] >= ATTACKER_ID) for m in run["metrics"]]
        figures[name] = {"accuracy_pct": acc, "zero_model_aggregated": accepted, "codes": run["codes"]}
        print(f"  {name:<45} accuracy by round {acc}  zero model aggregated in rounds: "
              f"{[i + 1 for i, n in enumerate(accepted) if n]}")
    print(json.dumps({"bench": "hostile-zero-model", "clients": args.clients, "limit": args.limit,
                      "rounds": args.rounds, "test_limit": args.test_limit, "runs": figures}))
    return 0 if all(c == 0 for r in runs.values() for c in r["codes"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="flhostile-"))
    out.mkdir(parents=True, exist_ok=True)
    tls = ([], [], None) if args.no_tls else make_tls(out)
    if args.zero_model:
        print(f"zero-model measurement: {args.clients} honest clients x {args.limit} samples, {args.rounds} rounds, "
              f"test {args.test_limit}, claims {args.zero_model}; logs in {out}", flush=True)
        return zero_model(args, out, tls)
    marker = out / "PWNED"
    print(f"hostile federation bench: {args.clients} clients x {args.limit} samples, {args.rounds} rounds, "
          f"test {args.test_limit}{'' if args.no_tls else ', TLS'}; {args.attacks} hostile connections at "
          f"<= {args.attack_rate:g}/s + {args.slowloris} slowloris + {args.idle} idle from {args.attacker_address}"
          f"{'' if args.no_participants else f'; participants: {len(PARTICIPANT_KINDS)} kinds, {args.stallers} stallers'}"
          f"; logs in {out}", flush=True)
    attacked = federation(args, out / "attacked", True, marker, tls)
    print(f"attacked run:    {attacked['wall_s']:.1f} s, exit codes {attacked['codes']}", flush=True)
    clean = federation(args, out / "undisturbed", False, marker, tls)
    print(f"undisturbed run: {clean['wall_s']:.1f} s, exit codes {clean['codes']}", flush=True)

    ok_runs = all(c == 0 for c in attacked["codes"] + clean["codes"]) and \
        len(attacked["metrics"]) == len(clean["metrics"]) == args.rounds
    acc_a = attacked["metrics"][-1]["accuracy"] if attacked["metrics"] else float("nan")
    acc_c = clean["metrics"][-1]["accuracy"] if clean["metrics"] else float("nan")
    diff_pp = 100 * (acc_a - acc_c)
    counts = attacked["counts"]
    pwned = marker.exists()
    passed = ok_runs and abs(diff_pp) <= args.tolerance_pp and not pwned and not attacked["admitted"] \
        and attacked["tracebacks"] == 0 and attacked["escape_bytes_in_log"] == 0
    kinds = [*KINDS, "slowloris", "idle", *PARTICIPANT_KINDS]
    lasted = attacked["slowloris_s"] or [0.0]
    idle = attacked["idle_s"] or [0.0]
    print()
    print(f"  final accuracy, attacked     {100 * acc_a:.2f}%  (clients per round {attacked['clients_per_round']})")
    print(f"  final accuracy, undisturbed  {100 * acc_c:.2f}%  (clients per round {clean['clients_per_round']})")
    print(f"  difference                   {diff_pp:+.2f} pp (tolerance {args.tolerance_pp} pp)")
    print(f"  hostile attempts             {sum(counts.values())}: " +
          ", ".join(f"{k} {counts.get(k, 0)}" for k in kinds) +
          (f" (+{attacked['unreached']} after the server had exited, not counted)" if attacked["unreached"] else ""))
    print("  participants' outcomes       " + ", ".join(f"{k} {n}" for k, n in sorted(attacked["outcomes"].items())))
    print(f"  admitted                     {sum(attacked['admitted'].values())} {attacked['admitted'] or ''}; "
          f"rejected updates {attacked['rejected_updates']}; marker file created: {pwned}; "
          f"tracebacks {attacked['tracebacks']}; raw ESC bytes in the log {attacked['escape_bytes_in_log']}")
    print(f"  server log                   attacked {attacked['log_lines']} lines ({attacked['refused_lines']} "
          f"refusal lines counting {attacked['refused_connections']} connections), undisturbed {clean['log_lines']}")
    print(f"  slowloris / idle dropped     median {statistics.median(lasted):.1f} s, max {lasted[-1]:.1f} s / "
          f"held max {idle[-1]:.1f} s (--handshake-timeout {args.handshake_timeout:g})")
    print(f"  round seconds                attacked {attacked['round_s']}, undisturbed {clean['round_s']}")
    print(f"  peak server RSS              attacked {attacked['peak_rss_mb']:.0f} MB, "
          f"undisturbed {clean['peak_rss_mb']:.0f} MB (at start {attacked['baseline_rss_mb']:.0f} / "
          f"{clean['baseline_rss_mb']:.0f} MB)")
    print(f"  verdict                      {'PASS' if passed else 'FAIL'}")
    print(json.dumps({
        "bench": "hostile", "passed": passed, "accuracy_attacked": acc_a, "accuracy_undisturbed": acc_c,
        "diff_pp": round(diff_pp, 4), "tolerance_pp": args.tolerance_pp,
        "attempts": {k: counts.get(k, 0) for k in kinds}, "attempts_total": sum(counts.values()),
        "admitted": sum(attacked["admitted"].values()), "marker_created": pwned,
        "participant_outcomes": attacked["outcomes"], "rejected_updates": attacked["rejected_updates"],
        "refused_connections": attacked["refused_connections"], "refusal_log_lines": attacked["refused_lines"],
        "log_lines_attacked": attacked["log_lines"], "log_lines_undisturbed": clean["log_lines"],
        "slowloris_median_s": round(statistics.median(lasted), 2), "slowloris_max_s": round(lasted[-1], 2),
        "idle_held_max_s": round(idle[-1], 2),
        "peak_rss_mb_attacked": round(attacked["peak_rss_mb"], 1),
        "peak_rss_mb_undisturbed": round(clean["peak_rss_mb"], 1),
        "start_rss_mb_attacked": round(attacked["baseline_rss_mb"], 1),
        "start_rss_mb_undisturbed": round(clean["baseline_rss_mb"], 1),
        "wall_s_attacked": round(attacked["wall_s"], 1), "wall_s_undisturbed": round(clean["wall_s"], 1),
        "round_s_attacked": attacked["round_s"], "round_s_undisturbed": clean["round_s"],
        "clients_per_round_attacked": attacked["clients_per_round"],
        "clients_per_round_undisturbed": clean["clients_per_round"],
        "rounds": args.rounds, "clients": args.clients, "limit": args.limit, "test_limit": args.test_limit,
        "seed": args.seed, "tls": not args.no_tls,
    }))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
