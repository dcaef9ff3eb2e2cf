"""What a pre-authentication HELLO costs the server: ``control.decode_control`` on the
worst 4 KiB a peer can send before it authenticates (a string of ``"x\\`` repeated: every
quote opens a string that never closes) against a benign HELLO of the same size (valid,
padded with JSON whitespace), and how long a counting thread is held up meanwhile.

Figures are ratios within one invocation (the shared machine's absolute times vary):
``ratio`` is the hostile message's median decode time over the benign one's; ``stall`` is
the longest gap the other thread saw while hostile messages were decoded, over its longest
gap while benign ones were.

    python bench/control_scan.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl.wire.control import CONTROL_MAX_FRAME, NONCE_SIZE, decode_control  # noqa: E402
from fl.wire.errors import ProtocolError  # noqa: E402


def messages() -> tuple[bytes, bytes]:
    """(hostile, benign), both exactly CONTROL_MAX_FRAME bytes."""
    hostile = ('"x\\' * CONTROL_MAX_FRAME)[:CONTROL_MAX_FRAME].encode()
    body = {"client_id": 3, "num_samples": 600, "options": {"device": "cpu"}, "nonce": secrets.token_hex(NONCE_SIZE)}
    raw = json.dumps(body, separators=(",", ":"))
    benign = (raw[:-1] + " " * (CONTROL_MAX_FRAME - len(raw)) + "}").encode()
    assert len(hostile) == len(benign) == CONTROL_MAX_FRAME
    decode_control("HELLO", benign)  # valid
    return hostile, benign


def decode_times(raw: bytes, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            decode_control("HELLO", raw)
        except ProtocolError:
            pass
        times.append(time.perf_counter() - start)
    return times


def longest_gap(raw: bytes, repeats: int) -> float:
    """The longest time a thread that only reads the clock went without running while
    ``raw`` was decoded ``repeats`` times."""
    done, gaps = threading.Event(), [0.0]

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    decode_times(raw, repeats)
    done.set()
    ticker.join()
    return gaps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    hostile, benign = messages()
    decode_times(hostile, 5), decode_times(benign, 5)  # warm up
    hostile_ms = statistics.median(decode_times(hostile, args.repeats)) * 1e3
    benign_ms = statistics.median(decode_times(benign, args.repeats)) * 1e3
    stall = [longest_gap(raw, max(args.repeats // 10, 5)) * 1e3 for raw in (hostile, benign)]
    print(f"hostile HELLO ({len(hostile)} bytes): {hostile_ms:.3f} ms median")
    print(f"benign HELLO ({len(benign)} bytes): {benign_ms:.3f} ms median")
    print(f"ratio {hostile_ms / benign_ms:.1f}x; another thread's longest stall {stall[0]:.2f} ms "
          f"(benign: {stall[1]:.2f} ms)")
    print(json.dumps({"hostile_ms": round(hostile_ms, 4), "benign_ms": round(benign_ms, 4),
                      "ratio": round(hostile_ms / benign_ms, 2), "stall_ms": round(stall[0], 2),
                      "benign_stall_ms": round(stall[1], 2)}))


if __name__ == "__main__":
    main()
