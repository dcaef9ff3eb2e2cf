"""Run a whole federation on this machine: one server and N clients as real processes.

    python simulate.py --clients 3 --rounds 3 [--quantization] [--partition dirichlet]

Picks a free port on 127.0.0.1, shares the CPU cores between the processes, shows the
server's progress, keeps each client's log in the run folder (``runs/<timestamp>/``
with the metrics, the checkpoint and a plot), and returns the server's exit status.
On Ctrl-C or when any process fails it stops every process it started.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def threads_per_client(clients: int, cores: int) -> int:
    """Oversubscribing 2 cores with intra-op threads only adds contention: give each
    client its share, at least one."""
    return max(1, cores // max(1, clients))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run a local federation: a server and N clients on 127.0.0.1.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=3, help="number of client processes")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: $MNIST_DATA_DIR or ./data)")
    p.add_argument("--quantization", action="store_true", help="clients send 8-bit quantized updates")
    p.add_argument("--quantized-clients", type=int, default=None,
                   help="only the first N clients quantize (a mixed federation)")
    p.add_argument("--stochastic-rounding", action="store_true", help="quantized clients round stochastically")
    p.add_argument("--quantize-broadcast", action="store_true", help="server sends 8-bit model deltas")
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid", help="how the shards are drawn")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate in round 1")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine", help="learning rate over rounds")
    p.add_argument("--batch-size", type=int, default=64, help="clients' batch size")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--limit", type=int, default=None, help="each client trains on at most N samples (quick runs)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, the split and training")
    p.add_argument("--secret", default=None, help="shared secret for the run (default: a fresh random one)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="clients' device")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot at the end")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        p.error("--clients and --rounds must be at least 1")
    return args


def build_commands(args: argparse.Namespace, port: int, out: Path) -> tuple[list[str], list[list[str]]]:
    cores = os.cpu_count() or 1
    py = [sys.executable]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    server = py + [str(HERE / "server.py"), "--port", str(port), "--rounds", str(args.rounds),
                   "--min-clients", str(args.clients), "--local-epochs", str(args.local_epochs),
                   "--lr", str(args.lr), "--lr-schedule", args.lr_schedule, "--batch-size", str(args.batch_size),
                   "--seed", str(args.seed), "--checkpoint", str(out / "checkpoint.pt"),
                   "--metrics", str(out / "metrics.jsonl"), "--threads", "1"] + data
    if args.no_augment:
        server.append("--no-augment")
    if args.quantize_broadcast:
        server.append("--quantize-broadcast")
    if args.test_limit:
        server += ["--test-limit", str(args.test_limit)]
    quantized = args.clients if args.quantization else (args.quantized_clients or 0)
    clients = []
    for i in range(args.clients):
        cmd = py + [str(HERE / "client.py"), "--port", str(port), "--client-id", str(i),
                    "--num-clients", str(args.clients), "--partition", args.partition, "--alpha", str(args.alpha),
                    "--seed", str(args.seed), "--threads", str(threads_per_client(args.clients, cores)),
                    "--device", args.device, "--no-progress"] + data
        if i < quantized:
            cmd.append("--quantization")
            if args.stochastic_rounding:
                cmd.append("--stochastic-rounding")
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        clients.append(cmd)
    return server, clients


def stop_all(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else HERE / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    try:  # fetch/check the data once here, rather than racing N+1 downloads
        from data import DataError, load_mnist, resolve_data_dir

        for train in (True, False):
            load_mnist(resolve_data_dir(args.data_dir), train=train)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_cmd, client_cmds = build_commands(args, port, out)
    env = dict(os.environ, FL_SECRET=args.secret or os.urandom(16).hex(), PYTHONUNBUFFERED="1")
    print(f"run folder: {out}\nserver on 127.0.0.1:{port}, {args.clients} clients, {args.rounds} rounds; "
          f"client logs: {out}/client-<i>.log", file=sys.stderr)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        server = subprocess.Popen(server_cmd, env=env)
        procs.append(server)
        for i, cmd in enumerate(client_cmds):
            log = open(out / f"client-{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        while server.poll() is None:
            for i, p in enumerate(procs[1:]):
                if p.poll() not in (None, 0):
                    print(f"error: client {i} exited with status {p.returncode}; stopping the federation\n"
                          f"{tail(out / f'client-{i}.log')}", file=sys.stderr)
                    stop_all(procs)
                    return p.returncode or 1
            time.sleep(0.2)
        status = server.returncode
        for i, p in enumerate(procs[1:]):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"warning: client {i} did not exit; stopping it", file=sys.stderr)
        stop_all(procs)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the server and the clients", file=sys.stderr)
        stop_all(procs)
        return 130
    finally:
        for log in logs:
            log.close()
    if status == 0 and not args.no_plot:
        make_plot(out)
    print(f"metrics: {out / 'metrics.jsonl'}\ncheckpoint: {out / 'checkpoint.pt'}", file=sys.stderr)
    return status


def make_plot(out: Path) -> None:
    try:
        import plot
        from checkpoint import read_metrics

        png = plot.plot_metrics([(out.name, read_metrics(out / "metrics.jsonl"))], out / "curve.png")
        print(f"plot: {png}", file=sys.stderr)
    except ImportError:
        print("plot: skipped (pip install matplotlib to get curve.png)", file=sys.stderr)
    except Exception as exc:  # a plot must never turn a finished run into a failure
        print(f"plot: skipped ({exc})", file=sys.stderr)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # a killed launcher still stops its children
    sys.exit(main())
