"""The model seam, measured: a second built-in model federates MNIST, and a client with
another model than the server's is refused before it trains.

1. ``simulate.py --clients 3 --rounds 3 --model resnet-small`` on the full MNIST (each
   client its whole IID shard of 20,000 images), accuracy by round and wall time;
   ``--baseline`` runs the same with the default improved-cnn for comparison.
2. A real ``server.py --model resnet-small`` and a ``client.py --model improved-cnn``
   with its own split: the client's exit status, the one line it prints, the seconds
   from its start to its exit, and that it logged no training round.

    python bench/models.py [--baseline] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import DEFAULT_DATA, REPO, run_simulation  # noqa: E402


def federate(model: str, a: argparse.Namespace) -> dict:
    args = ["--clients", str(a.clients), "--rounds", str(a.rounds), "--model", model, "--seed", str(a.seed),
            "--data-dir", a.data_dir, *(["--limit", str(a.limit)] if a.limit else [])]
    r = run_simulation(args)
    acc = [m["accuracy"] for m in r["metrics"]]
    print(f"{model:>13}: accuracy by round {' '.join(f'{100 * x:.2f}%' for x in acc)}; wall {r['wall_s']:.0f} s")
    return {"accuracy": acc, "wall_s": r["wall_s"], "run": r["out"]}


def refused(data_dir: str) -> dict:
    """A client with improved-cnn against a resnet-small server: status, line, seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    tmp = Path(tempfile.mkdtemp(prefix="flbench-models-"))
    server_log = tmp / "server.log"
    server = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--port", port, "--model", "resnet-small",
                               "--data-dir", data_dir, "--no-download", "--no-progress", "--rounds", "1",
                               "--min-clients", "1", "--checkpoint", str(tmp / "ckpt.pt"),
                               "--metrics", str(tmp / "metrics.jsonl")], cwd=REPO, stdout=open(server_log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        while "listening on" not in server_log.read_text():
            if server.poll() is not None:
                raise SystemExit(f"server.py exited {server.returncode}: {server_log.read_text()[-500:]}")
            time.sleep(0.1)
        start = time.monotonic()
        client = subprocess.run([sys.executable, str(REPO / "client.py"), "--port", port, "--model", "improved-cnn",
                                 "--client-id", "0", "--num-clients", "3", "--data-dir", data_dir, "--no-download",
                                 "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
    finally:
        server.kill()
        server.wait()
    text = client.stdout + client.stderr
    errors = [line for line in text.splitlines() if "ERROR" in line]
    trained = any(" round " in line and "loss" in line for line in text.splitlines())
    print(f"mismatched client: exit {client.returncode} after {seconds:.1f} s, trained: {trained}; "
          f"{len(errors)} error line: {errors[0] if errors else '(none)'}")
    return {"exit": client.returncode, "seconds": seconds, "errors": errors, "trained": trained}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="samples each client trains on (0: its whole shard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="also federate the default improved-cnn")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    a = p.parse_args()
    out = {"args": vars(a), "refused": refused(a.data_dir), "resnet-small": federate("resnet-small", a)}
    if a.baseline:
        out["improved-cnn"] = federate("improved-cnn", a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
