"""Run a whole federation: one server and N clients trained by W worker processes.

    python simulate.py --clients 3 --rounds 3 [--quantization] [--partition dirichlet]
    python simulate.py --clients 100 --fraction 0.1 --rounds 20 --partition shards
    python simulate.py --clients 100 --engine ray [--ray-address HOST:6379 --host 0.0.0.0 --port 8080]
    python simulate.py --out runs/a --rounds 5 --resume      # continue runs/a up to round 5

Every client is a real client of the server (its own connection and handshake), hosted
by a ``worker.py`` process that holds torch, the data and one model once for all of its
clients. One worker holds every connection and trains on W processes (``--engine process``,
the default) or W Ray actors on a local Ray or an existing cluster (``--engine ray``), each
sampled client on whichever is free (``hosting``). The server is the same either way.
Flags this launcher does not know go to ``server.py`` unchanged (``--strategy fedadam
--server-lr 0.01``, ``--round-timeout 60``...).

Picks a free port, shares the CPU cores between the workers, shows the server's progress,
keeps each worker's log in the run folder (``runs/<timestamp>/`` with the metrics, the
checkpoint, a plot and TensorBoard event files), and returns the server's exit status.
When a worker fails, on Ctrl-C, or when the server fails, it stops everything it started.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from fl.common.cli import HelpFormatter, add_secret_arguments
from fl.common.exits import interrupt_on_sigterm
from fl.common.ids import format_ids  # worker.py's --client-ids form
from fl.learning.config import DATASETS, TrainingConfig
from fl.server import tensorboard
from fl.server.config import ServerConfig
from fl.server.outputs import OutputsError, check_outputs
from fl.wire.credentials import CredentialError, resolve_secret

TRAINING, SERVER = TrainingConfig(), ServerConfig()  # the defaults the server's flags have too (no torch import)

HERE = Path(__file__).resolve().parent
SCHEMES = ("iid", "dirichlet", "shards")  # data.SCHEMES; not imported, so the launcher never loads torch
# Server flags the launcher sets itself: passing them through would break the run folder or the workers.
OWN_SERVER_FLAGS = ("--port", "--host", "--checkpoint", "--metrics", "--secret")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_workers(clients: int, cores: int) -> int:
    """One worker per core; a federation of at most two clients per core gets a worker per
    client instead (the quickstart's layout: no slower, and memory is no issue there)."""
    return clients if clients <= 2 * cores else cores


def threads_per_worker(workers: int, cores: int) -> int:
    """Oversubscribing 2 cores with intra-op threads only adds contention: give each
    worker its share, at least one."""
    return max(1, cores // max(1, workers))


def split_clients(clients: int, workers: int) -> list[list[int]]:
    """Contiguous id ranges, sizes differing by at most one: 10 over 3 -> 0-3, 4-6, 7-9."""
    base, extra = divmod(clients, workers)
    out, start = [], 0
    for w in range(workers):
        size = base + (w < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def hosting(clients: int, workers: int) -> tuple[list[list[int]], int]:
    """Which clients each worker process hosts, and on how many training processes.

    When a worker would host more than one client, ONE worker holds every connection and
    trains on ``workers`` processes (or Ray actors), each sampled client on whichever is free
    (``fl/client/trainer_pool.py``). Split into fixed halves instead, 10 sampled clients of 100 fall 6
    and 4 (or worse) more often than 5 and 5, and the round waits for the busier half."""
    if workers < clients:
        return [list(range(clients))], workers
    return split_clients(clients, workers), 1


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's flags, and the rest (passed to server.py as they are)."""
    p = argparse.ArgumentParser(
        description="Run a federation: a server and N clients trained by W processes (or Ray actors). "
                    "Flags not listed here are passed to server.py unchanged.",
        formatter_class=HelpFormatter, allow_abbrev=False)  # else server.py's --mode would be read as --model
    add_federation_flags(p.add_argument_group("federation"))
    add_worker_flags(p.add_argument_group("workers"))
    add_output_flags(p.add_argument_group("output"))
    args, server_extra = p.parse_known_args(argv)
    check_args(p, args, server_extra)
    return args, server_extra


def add_federation_flags(fl: argparse._ArgumentGroup) -> None:
    """What the federation is: clients, rounds, data split, training; the server and the
    workers both get these."""
    fl.add_argument("--clients", type=int, default=3, help="number of clients")
    fl.add_argument("--rounds", type=int, default=3, help="federated rounds")
    fl.add_argument("--fraction", type=float, default=None,
                    help="fraction of the clients the server samples each round (passed to server.py)")
    fl.add_argument("--strategy", default=None,
                    help="server strategy, e.g. fedavg, fedprox, fedadam (passed to server.py with its own flags)")
    fl.add_argument("--quantization", action="store_true", help="clients send 8-bit quantized updates")
    fl.add_argument("--quantized-clients", type=int, default=None,
                    help="only the first N clients quantize (a mixed federation)")
    fl.add_argument("--stochastic-rounding", action="store_true", help="quantized clients round stochastically")
    fl.add_argument("--quantize-broadcast", action="store_true", help="server sends 8-bit model deltas")
    fl.add_argument("--partition", choices=SCHEMES, default="iid",
                    help="how the shards are drawn (shards: sorted by label, two per client, as in FedAvg's paper)")
    fl.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    fl.add_argument("--local-epochs", type=int, default=TRAINING.epochs, help="local epochs per round")
    fl.add_argument("--lr", type=float, default=TRAINING.lr, help="learning rate in round 1")
    fl.add_argument("--lr-schedule", choices=("cosine", "constant"), default=SERVER.lr_schedule,
                    help="learning rate over rounds")
    fl.add_argument("--batch-size", type=int, default=TRAINING.batch_size, help="clients' batch size")
    fl.add_argument("--no-augment", action="store_true", help="train without augmentation")
    fl.add_argument("--limit", type=int, default=None, help="each client trains on at most N samples (quick runs)")
    fl.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images (quick runs)")
    fl.add_argument("--seed", type=int, default=0, help="seed for the model, the split and training")
    fl.add_argument("--client-speeds", default=None, metavar="SPEC",
                    help="straggling clients, each slowed by a factor (worker.py --speed: after training it sleeps "
                         "factor-1 times its training time): lognormal:SIGMA[:MEDIAN] draws max(1, MEDIAN exp(SIGMA z)), "
                         "z ~ N(0, 1) seeded by --seed and the client id (MEDIAN 1: the faster half runs at this "
                         "machine's speed; MEDIAN 10: the median device is 10x slower than one core here); or "
                         "FILE: one factor per line for clients 0..N-1, or 'CLIENT_ID FACTOR' lines (others 1). "
                         "Written to <run folder>/speeds.json")


def add_worker_flags(run: argparse._ArgumentGroup) -> None:
    """Where the clients run and how they reach the server (local processes or Ray)."""
    run.add_argument("--workers", type=int, default=None,
                     help="processes (or Ray actors) that train the clients (default: one per client up to "
                          "twice os.cpu_count() clients, else os.cpu_count()); with fewer workers than clients, one "
                          "worker holds every connection and trains each sampled client on whichever is free")
    run.add_argument("--engine", choices=("process", "ray"), default="process",
                     help="workers as local processes, or as Ray actors (pip install -r requirements-ray.txt)")
    run.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. HOST:6379 or auto) instead of starting a local Ray")
    run.add_argument("--host", default=None,
                     help="address the server listens on (default 127.0.0.1; 0.0.0.0 with --ray-address)")
    run.add_argument("--connect-host", default=None,
                     help="address the workers connect to (default: 127.0.0.1, or this node's IP on a cluster)")
    run.add_argument("--port", type=int, default=None,
                     help="server port (default: a free one; on a cluster, a port the nodes can reach)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="workers' device")


def add_output_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument("--data-dir", default=None,
                     help="folder with the --dataset files (default: $MNIST_DATA_DIR or ./data)")
    out.add_argument("--dataset", choices=DATASETS, default="mnist", metavar="NAME",
                     help="passed to server.py and the workers: " + ", ".join(DATASETS))
    out.add_argument("--model", default="improved-cnn", metavar="NAME",
                     help="passed to server.py and the workers: improved-cnn, resnet-small, mlp, or "
                          "package.module:factory (importable: on PYTHONPATH)")
    add_secret_arguments(out, "the run's shared secret", ", else a fresh random one")
    out.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoint, up to --rounds (passed to server.py)")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh even where --out holds a previous run's checkpoint or metrics")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG plot at the end")
    out.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="TensorBoard event files of every round (default: <run folder>/tensorboard when the "
                          "tensorboard package is installed, else none)")
    out.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, server_extra: list[str]) -> None:
    """Refuse, through ``p.error``, values no run can use and server flags the launcher owns."""
    if args.clients < 1 or args.rounds < 1:
        p.error("--clients and --rounds must be at least 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.ray_address and args.engine != "ray":
        p.error("--ray-address needs --engine ray")
    own = [a for a in server_extra if a.split("=", 1)[0] in OWN_SERVER_FLAGS]
    if own:
        p.error(f"{own[0].split('=', 1)[0]} is set by the launcher (see --port, --host, --out, --secret)")
    if args.resume and not args.out:
        p.error("--resume needs --out: the folder of the run to continue")
    if args.tensorboard and args.no_tensorboard:
        p.error("--tensorboard and --no-tensorboard exclude each other")
    if args.tensorboard and (problem := tensorboard.problem(args.tensorboard)):
        p.error(problem)
    if args.client_speeds and args.ray_address:
        p.error("--client-speeds with --ray-address: the workers on other nodes cannot read this node's speeds.json")
    try:
        args.speeds = client_speeds(args.client_speeds, args.clients, args.seed) if args.client_speeds else None
    except ValueError as exc:
        p.error(f"--client-speeds {args.client_speeds}: {exc}")


# --- straggling clients -------------------------------------------------------------------

def client_speeds(spec: str, clients: int, seed: int) -> list[float]:
    """Every client's slowdown factor (>= 1), by ``--client-speeds``; ValueError, one line."""
    if spec.startswith("lognormal:"):
        parts = spec.split(":")[1:]
        try:
            sigma, median = float(parts[0]), float(parts[1]) if len(parts) == 2 else 1.0
        except (ValueError, IndexError):
            raise ValueError("expected lognormal:SIGMA or lognormal:SIGMA:MEDIAN, as in lognormal:1.0:10") from None
        if len(parts) > 2 or not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"expected lognormal:SIGMA[:MEDIAN] with a finite SIGMA >= 0, got {spec}")
        if not (math.isfinite(median) and median >= 1):
            raise ValueError(f"MEDIAN must be a finite number >= 1, got {parts[1]}")
        return [lognormal_speed(sigma, seed, cid, median) for cid in range(clients)]
    try:
        text = Path(spec).read_text()
    except OSError as exc:
        raise ValueError(f"neither lognormal:SIGMA nor a readable file ({exc.strerror or exc})") from None
    return parse_speeds(text, clients)


def lognormal_speed(sigma: float, seed: int, client_id: int, median: float = 1.0) -> float:
    """max(1, median exp(sigma z)), z ~ N(0, 1) drawn for this client alone: a client's factor
    does not depend on how many others there are. No client is faster than this machine.
    A median above 1 says the devices are slower than a core here; then clients training at
    once do not queue for this machine's few cores, which would time the cores, not the
    schedule."""
    z = random.Random(f"client-speed/{seed}/{client_id}").gauss(0.0, 1.0)
    return max(1.0, median * math.exp(sigma * z))


def parse_speeds(text: str, clients: int) -> list[float]:
    """A speeds file: one factor per line for clients 0..N-1, or 'CLIENT_ID FACTOR' lines
    (clients not named run at factor 1); blank lines and # comments skipped."""
    rows = [(n, line.split("#", 1)[0].split()) for n, line in enumerate(text.splitlines(), 1)]
    rows = [(n, fields) for n, fields in rows if fields]
    widths = {len(fields) for _, fields in rows}
    if not rows or not widths <= {1, 2} or len(widths) > 1:
        raise ValueError("expected one factor per line, or 'CLIENT_ID FACTOR' on every line")
    if widths == {1} and len(rows) != clients:
        raise ValueError(f"{len(rows)} factors for {clients} clients: give one per client, or 'CLIENT_ID FACTOR' lines")
    speeds = [1.0] * clients
    for i, (n, fields) in enumerate(rows):
        cid = i if len(fields) == 1 else _number(fields[0], n, int)
        if not 0 <= cid < clients:
            raise ValueError(f"line {n}: client {cid} is out of range for --clients {clients}")
        factor = _number(fields[-1], n, float)
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"line {n}: a factor must be a finite number >= 1, got {fields[-1]}")
        speeds[cid] = factor
    return speeds


def _number(text: str, line: int, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"line {line}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def write_speeds(args: argparse.Namespace, out: Path) -> Path:
    """The run's factors in its folder (worker.py --speeds reads them), so a run can be repeated."""
    path = out / "speeds.json"
    record = {"client_speeds": args.client_speeds, "seed": args.seed,
              "speeds": {str(cid): factor for cid, factor in enumerate(args.speeds)}}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def listen_host(args: argparse.Namespace) -> str:
    return args.host or ("0.0.0.0" if args.ray_address else "127.0.0.1")


def tensorboard_dir(args: argparse.Namespace, out: Path) -> Path | None:
    """Where the server writes TensorBoard event files; None: nowhere."""
    if args.no_tensorboard:
        return None
    if args.tensorboard:
        return Path(args.tensorboard)
    return out / "tensorboard" if tensorboard.available() else None


def build_commands(args: argparse.Namespace, server_extra: list[str], port: int, out: Path,
                   cores: int | None = None) -> tuple[list[str], list[list[str]]]:
    """The server's command line, and each worker's worker.py arguments (without the
    interpreter, so a Ray actor can run them in its own process)."""
    cores = cores or os.cpu_count() or 1
    workers = min(args.clients, args.workers or default_workers(args.clients, cores))
    data = (["--data-dir", args.data_dir] if args.data_dir else []) + ["--dataset", args.dataset, "--model", args.model]
    server = [sys.executable, str(HERE / "server.py"), "--host", listen_host(args), "--port", str(port),
              "--rounds", str(args.rounds), "--min-clients", str(args.clients),
              "--max-connections", str(max(128, args.clients + 32)),  # room for reconnects
              "--local-epochs", str(args.local_epochs), "--lr", str(args.lr), "--lr-schedule", args.lr_schedule,
              "--batch-size", str(args.batch_size), "--seed", str(args.seed),
              "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.jsonl"),
              "--threads", "1"] + data
    if args.no_augment:
        server.append("--no-augment")
    if args.quantize_broadcast:
        server.append("--quantize-broadcast")
    if args.test_limit:
        server += ["--test-limit", str(args.test_limit)]
    if args.fraction is not None:
        server += ["--fraction", str(args.fraction)]
    if args.strategy is not None:
        server += ["--strategy", args.strategy]
    server += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    if (events := tensorboard_dir(args, out)) is not None:
        server += ["--tensorboard", str(events)]
    server += server_extra  # last, so an explicit server flag wins over the launcher's choice
    quantized = args.clients if args.quantization else (args.quantized_clients or 0)
    threads = threads_per_worker(workers, cores)
    groups, trainers = hosting(args.clients, workers)
    worker_args = []
    for ids in groups:
        cmd = ["--client-ids", format_ids(ids), "--num-clients", str(args.clients),
               "--port", str(port), "--partition", args.partition, "--alpha", str(args.alpha),
               "--seed", str(args.seed), "--threads", str(threads), "--device", args.device, "--no-progress"] + data
        if trainers > 1:
            cmd += ["--trainers", str(trainers)]
        if args.connect_host:
            cmd += ["--host", args.connect_host]
        q = [i for i in ids if i < quantized]
        if q:
            cmd += ["--quantize-ids", format_ids(q)]
            if args.stochastic_rounding:
                cmd.append("--stochastic-rounding")
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.speeds:
            cmd += ["--speeds", str(out / "speeds.json")]
        worker_args.append(cmd)
    return server, worker_args


def prepare_data(data_dir: str | None, dataset: str = "mnist", model: str = "improved-cnn") -> str | None:
    """Fetch or check the dataset once here, rather than racing every worker's download; the
    error line, or None. In a child process, so the launcher never holds torch (~0.5 GB)."""
    code = ("import sys\nfrom fl.learning.data import DataError, resolve_data_dir\n"
            "from fl.learning.datasets import load_dataset\nfrom fl.learning.models import check_trainable\n"
            "try:\n    check_trainable(sys.argv[2], sys.argv[3])\n"
            "    [load_dataset(sys.argv[2], resolve_data_dir(sys.argv[1] or None), train=t) for t in (True, False)]\n"
            "except (DataError, ValueError) as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code, data_dir or "", dataset, model], cwd=HERE, capture_output=True,
                       text=True)
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"checking the data failed with status {r.returncode}"


# --- engines: where the workers run -------------------------------------------------------

class ProcessEngine:
    """Workers as child processes of this launcher, each logging to its own file."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[TextIO] = []

    def describe(self) -> str:
        return "local processes"

    def trainers(self) -> str:
        return "processes"

    def start(self, worker_args: list[list[str]], run_env: dict[str, str], log_paths: list[Path],
              trainers: int = 1) -> None:
        """``trainers``: what worker.py's --trainers (in ``worker_args``) already asks for."""
        env = dict(os.environ, **run_env)
        for argv, path in zip(worker_args, log_paths):
            log = open(path, "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, str(HERE / "worker.py"), *argv], env=env,
                                               stdout=log, stderr=subprocess.STDOUT))

    def poll(self) -> tuple[int, int] | None:
        """A worker that ended with a non-zero status: (index, status)."""
        for i, p in enumerate(self.procs):
            if p.poll() not in (None, 0):
                return i, p.returncode
        return None

    def wait(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s for all workers to end; the indices of those still running."""
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def stop(self) -> None:
        stop_all(self.procs)
        for log in self.logs:
            log.close()


class RayEngine:
    """Workers as Ray actors, on a local Ray or an existing cluster. A worker actor runs
    worker.py's main loop and connects back to the server's host:port; when it hosts many
    clients it trains them on ``RayTrainer`` actors (one CPU each) wherever Ray places them."""

    def __init__(self, address: str | None, workers: int) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a simulation
        try:
            import ray
        except ImportError:
            raise RuntimeError("--engine ray needs Ray: pip install -r requirements-ray.txt") from None
        self.ray = ray
        self.local = address is None
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if self.local:  # one CPU per worker; the server and this launcher run outside Ray
            ray.init(num_cpus=workers, **kwargs)
        else:  # ship this folder's code to the nodes (what .gitignore lists stays here)
            ray.init(address=address, runtime_env={"working_dir": str(HERE), "excludes": ["bench/", "docs/", "tests/"]},
                     **kwargs)
        self.actors: list[Any] = []
        self.refs: list[Any] = []
        self.status: dict[int, int] = {}

    def describe(self) -> str:
        return "Ray actors on " + ("a local Ray" if self.local else "the Ray cluster")

    def node_ip(self) -> str:
        return self.ray.util.get_node_ip_address()

    def trainers(self) -> str:
        return "Ray actors"

    def start(self, worker_args: list[list[str]], run_env: dict[str, str], log_paths: list[Path],
              trainers: int = 1) -> None:
        """``run_env`` (the secret) travels as an argument: never on a command line. With
        ``trainers`` > 1 the one worker holds connections only (no CPU reserved) and trains
        on that many trainer actors."""
        ray = self.ray
        argv = worker_args[0]
        setup = [argv[argv.index(f) + 1] if f in argv else None
                 for f in ("--data-dir", "--device", "--threads", "--dataset", "--model")]
        trainer_actors = [ray.remote(num_cpus=1)(RayTrainer).remote(*setup, run_env) for _ in range(trainers)] \
            if trainers > 1 else []
        self.actors += trainer_actors
        worker_class = ray.remote(num_cpus=0 if trainer_actors else 1)(RayWorker)
        for argv, path in zip(worker_args, log_paths):
            actor = worker_class.remote()
            self.actors.append(actor)
            self.refs.append(actor.run.remote(argv + ["--log-file", str(path)], run_env, trainer_actors))

    def _collect(self, timeout: float) -> None:
        pending = [r for i, r in enumerate(self.refs) if i not in self.status]
        if not pending:
            return
        ready, _ = self.ray.wait(pending, num_returns=len(pending), timeout=timeout)
        for ref in ready:
            i = self.refs.index(ref)
            try:
                self.status[i] = int(self.ray.get(ref))
            except Exception as exc:  # the actor died (killed, out of memory, node lost)
                print(f"error: worker {i} (Ray actor) failed: {str(exc).strip().splitlines()[0][:300]}",
                      file=sys.stderr)
                self.status[i] = 1

    def poll(self) -> tuple[int, int] | None:
        self._collect(timeout=0)
        for i, status in sorted(self.status.items()):
            if status != 0:
                return i, status
        return None

    def wait(self, timeout: float) -> list[int]:
        end = time.monotonic() + timeout
        while len(self.status) < len(self.refs) and time.monotonic() < end:
            self._collect(timeout=min(1.0, max(0.0, end - time.monotonic())))
        return [i for i in range(len(self.refs)) if i not in self.status]

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.ray.shutdown()


class RayWorker:
    """A Ray actor's body: worker.py's main loop, in the actor's own process. Defined here,
    importing worker (and torch) only inside the actor, so the launcher stays small."""

    def run(self, argv: list[str], run_env: dict[str, str], trainers: list[Any]) -> int:
        os.environ.update(run_env)
        import worker

        return worker.main(argv, trainers or None)


class RayTrainer:
    """A Ray actor's body: one training process of a worker (``trainer_pool``), one thread."""

    def __init__(self, data_dir: str | None, device: str | None, threads: str | None, dataset: str | None,
                 model: str | None, run_env: dict[str, str]) -> None:
        os.environ.update(run_env)
        from fl.client import trainer_pool
        from fl.client.config import pick_device
        from fl.learning.data import resolve_data_dir

        default = trainer_pool.DEFAULT_TASK
        task = trainer_pool.Task(model or default.model, dataset or default.dataset)  # the worker's flags
        trainer_pool.start_trainer(str(resolve_data_dir(data_dir)), True, str(pick_device(device or "cpu")),
                                   int(threads or 1), task)

    def ready(self) -> bool:
        return True

    def fit(self, *job: Any) -> Any:
        from fl.client import trainer_pool

        return trainer_pool.fit_job(*job)


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
    args, server_extra = parse_args(argv)
    out = Path(args.out) if args.out else HERE / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        secret = run_secret(args)
        check_outputs(out / "checkpoint.pt", out / "metrics.jsonl", args.resume, args.overwrite)
    except (CredentialError, OutputsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    error = prepare_data(args.data_dir, args.dataset, args.model)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.speeds:
        write_speeds(args, out)
    listen = listen_host(args)
    port = args.port or free_port("" if listen == "0.0.0.0" else listen)
    workers = min(args.clients, args.workers or default_workers(args.clients, os.cpu_count() or 1))
    engine: ProcessEngine | RayEngine | None = None
    server: subprocess.Popen | None = None
    try:
        try:
            engine = make_engine(args, workers)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        server_cmd, worker_args = build_commands(args, server_extra, port, out)
        run_env = {"FL_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        log_paths = [out / f"worker-{i}.log" for i in range(len(worker_args))]
        groups, trainers = hosting(args.clients, workers)
        announce(args, out, f"{listen}:{port}", engine, groups, trainers)
        server = subprocess.Popen(server_cmd, env=dict(os.environ, **run_env))
        engine.start(worker_args, run_env, log_paths, trainers)
        failure = watch(server, engine, log_paths)
        if failure is not None:
            return failure
        status = server.returncode
        if status == 0:  # the workers were told DONE: let them finish
            for i in engine.wait(timeout=30):
                print(f"warning: worker {i} did not exit; stopping it", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the server and the workers", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            stop_all([server])
        if engine is not None:
            engine.stop()
    if status == 0 and not args.no_plot:
        make_plot(out)
    print_outputs(args, out)
    return status


def print_outputs(args: argparse.Namespace, out: Path) -> None:
    """Where the run's files are, last, so they are what a user sees when it ends."""
    print(f"metrics: {out / 'metrics.jsonl'}\ncheckpoint: {out / 'checkpoint.pt'}", file=sys.stderr)
    if (events := tensorboard_dir(args, out)) is not None:
        print(f"tensorboard: tensorboard --logdir {events}", file=sys.stderr)


def run_secret(args: argparse.Namespace) -> str:
    """The secret the server and the workers share: --secret, --secret-file or $FL_SECRET
    as server.py reads them (``resolve_secret``), else a fresh random one for this run.
    CredentialError, one line, for a file that cannot be used."""
    secret = resolve_secret(args.secret, args.secret_file)
    return os.fsdecode(secret) if secret else os.urandom(16).hex()


def make_engine(args: argparse.Namespace, workers: int) -> ProcessEngine | RayEngine:
    """The engine ``--engine`` names; RuntimeError when Ray is missing. On a Ray cluster the
    workers connect back to this node's IP unless ``--connect-host`` says otherwise."""
    if args.engine != "ray":
        return ProcessEngine()
    engine = RayEngine(args.ray_address, workers)
    if args.ray_address and not args.connect_host:
        args.connect_host = engine.node_ip()
    return engine


def announce(args: argparse.Namespace, out: Path, address: str, engine: ProcessEngine | RayEngine,
             groups: list[list[int]], trainers: int) -> None:
    """The run's one-line summary, so a user sees where the server and the logs are."""
    sizes = sorted({len(ids) for ids in groups})
    where = (f"1 worker training on {trainers} {engine.trainers()}" if trainers > 1 else
             f"{len(groups)} workers ({engine.describe()}; {'-'.join(map(str, sizes))} clients each)")
    print(f"run folder: {out}\nserver on {address}, {args.clients} clients in {where}, {args.rounds} rounds"
          f"{'' if args.fraction is None else f', fraction {args.fraction}'}; worker logs: {out}/worker-<i>.log",
          file=sys.stderr)
    if args.speeds:
        ordered = sorted(args.speeds)
        print(f"client speeds ({args.client_speeds}): slowdown median x{ordered[len(ordered) // 2]:.2f}, slowest "
              f"x{ordered[-1]:.2f}; {out / 'speeds.json'}", file=sys.stderr)


def watch(server: subprocess.Popen, engine: ProcessEngine | RayEngine, log_paths: list[Path]) -> int | None:
    """Wait for the server to end; a failed worker's status (never 0) as soon as one fails,
    or None once the server has ended: one failed worker stops the whole federation."""
    while server.poll() is None:
        failed = engine.poll()
        if failed is not None:
            i, status = failed
            print(f"error: worker {i} exited with status {status}; stopping the federation\n"
                  f"{tail(log_paths[i])}", file=sys.stderr)
            return status or 1
        time.sleep(0.2)
    return None


def make_plot(out: Path) -> None:
    try:
        import plot
        from fl.server.checkpoint import read_metrics

        png = plot.plot_metrics([(out.name, read_metrics(out / "metrics.jsonl"))], out / "curve.png")
        print(f"plot: {png}", file=sys.stderr)
    except ImportError:
        print("plot: skipped (pip install matplotlib to get curve.png)", file=sys.stderr)
    except Exception as exc:  # a plot must never turn a finished run into a failure
        print(f"plot: skipped ({exc})", file=sys.stderr)


if __name__ == "__main__":
    interrupt_on_sigterm()  # a killed launcher still stops its children
    sys.exit(main())
