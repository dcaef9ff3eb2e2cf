"""Many virtual clients in one process: a worker for simulating large federations.

    python worker.py --client-ids 0-49 --num-clients 100 [--port 8080] [--quantization]

Each hosted client is a real client to the server: its own connection, its own
authenticated handshake, the same MODEL/UPDATE messages (and 8-bit option) as
``client.py``, which runs the same ``participant.Participant``. What the process holds
once is what makes a client process cost ~0.9 GB: torch, the MNIST training set (each
client keeps only its shard's indices into it) and ONE model. The clients the server
samples in a round train one after another under a lock, or with ``--trainers N`` on N
training processes, each client on whichever is free (``fl/client/trainer_pool.py``); the others
block in poll() on their sockets. Each client's training is seeded from (seed, client id,
round), so a virtual client trains exactly as the same client in a process of its own would.

    python worker.py --client-ids 0-99 --num-clients 100 --trainers 2

The worker exits 0 when every hosted client has been told DONE, and as soon as any of
them fails (unreachable server, refused secret, protocol error) with that client's status.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import torch

from fl.client.config import ClientConfig, check_client_arguments, client_parser, pick_device, read_speeds
from fl.client.host import Host, build_task
from fl.client.participant import Participant
from fl.client.trainer_pool import RayTrainers, Task, TrainerPool
from fl.common.exits import exit_now, interrupt_on_sigterm
from fl.common.ids import format_ids, parse_ids
from fl.common.limits import raise_open_files
from fl.common.logs import setup_logging
from fl.learning import augment, models
from fl.learning.data import DataError, partition, resolve_data_dir, subset
from fl.learning.datasets import load_dataset

log = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, groups = client_parser("Host many virtual federated clients in one process (one model, one copy of the data).")
    fl = groups["federation"]
    fl.add_argument("--client-ids", required=True, help="the clients this worker hosts, e.g. 0-49 or 0-9,20-29")
    fl.add_argument("--quantize-ids", default=None,
                    help="only these hosted clients send 8-bit updates (default: all with --quantization, else none)")
    fl.add_argument("--speeds", default=None, metavar="FILE",
                    help="per-client slowdown factors (see --speed): a speeds.json as simulate.py --client-speeds "
                         "writes it; hosted clients it does not name run at --speed")
    groups["run"].add_argument("--trainers", type=int, default=1,
                               help="train the sampled clients on this many processes, each client on whichever "
                                    "is free (fl/client/trainer_pool.py); 1: on this process, one after another")
    groups["run"].add_argument("--log-file", default=None, help="also write the log to this file")
    p.set_defaults(threads=1, device="cpu")  # a worker shares the cores with others: one thread each
    for action in p._actions:  # the shared help of --threads describes client.py's default
        if action.dest == "threads":
            action.help = "torch CPU threads"
    args = p.parse_args(argv)
    check_client_arguments(p, args)
    try:
        args.client_ids = parse_ids(args.client_ids)
        args.quantize_ids = set(parse_ids(args.quantize_ids)) if args.quantize_ids else set()
        args.speeds = read_speeds(args.speeds) if args.speeds else {}
    except ValueError as exc:
        p.error(str(exc))
    if args.trainers < 1:
        p.error(f"--trainers must be at least 1, got {args.trainers}")
    out_of_range = [i for i in args.client_ids if i >= args.num_clients]
    if out_of_range:
        p.error(f"--client-ids {format_ids(out_of_range)} out of range for --num-clients {args.num_clients} "
                f"(valid: 0..{args.num_clients - 1})")
    return args


class Worker:
    """The hosted participants, each served by its own thread."""

    def __init__(self, participants: list[Participant], host: Host) -> None:
        self.participants, self.host = participants, host
        self.done: queue.Queue[tuple[int, int]] = queue.Queue()
        self.threads = [threading.Thread(target=self._run, args=(p,), name=f"client-{p.client_id}", daemon=True)
                        for p in participants]

    def _run(self, p: Participant) -> None:
        status = 1
        try:
            status = p.run()
        except Exception:  # a bug in one client must not leave the worker waiting forever
            log.exception("client %d: unexpected error", p.client_id)
        finally:
            self.done.put((p.client_id, status))

    def run(self) -> int:
        """Start every client; 0 once all are done, else the first failure's status."""
        try:
            return self._serve()
        finally:
            if isinstance(self.host, TrainerPool):  # RayTrainers' actors belong to the launcher
                self.host.close()

    def _serve(self) -> int:
        for t in self.threads:
            t.start()
        left = len(self.threads)
        while left:
            try:
                cid, status = self.done.get(timeout=1.0)
            except queue.Empty:
                continue
            left -= 1
            if status != 0:
                log.error("client %d failed (status %d); stopping this worker", cid, status)
                return status
        return 0


def build(args: argparse.Namespace, ray_trainers: list[Any] | None = None) -> Worker:
    """Load the data once, derive the hosted clients' shards, share one model among them
    (or train on --trainers processes, or on ``ray_trainers`` actors).
    Raises DataError or ValueError (bad data, split, secret or --tls-ca), one line."""
    device = pick_device(args.device)
    name = args.model or models.DEFAULT
    models.check_trainable(args.dataset, name)
    model, terms = build_task(name, args.dataset, resolve_data_dir(args.data_dir))
    images, labels = load_dataset(args.dataset, resolve_data_dir(args.data_dir), train=True,
                                  download=not args.no_download, test_fraction=args.test_fraction)
    parts = partition(labels, args.num_clients, args.partition, args.alpha, args.seed)
    config = ClientConfig.from_args(args)
    host: Host
    if ray_trainers:  # the data stays in the training processes; this one keeps the shards' indices
        host = RayTrainers(ray_trainers, device, model=model, terms=terms)
        del images
    elif args.trainers > 1:
        host = TrainerPool(args.trainers, str(resolve_data_dir(args.data_dir)), not args.no_download, device,
                           args.threads, Task(name, args.dataset, args.test_fraction), terms=terms)
        del images
    else:
        host = Host(images, labels, device, model=model, terms=terms, augment=augment.for_dataset(args.dataset))
    participants = []
    for cid in args.client_ids:
        idx = subset(parts[cid], args.limit, args.seed * 1009 + cid)
        quantize = config.quantization or cid in args.quantize_ids
        cfg = dataclasses.replace(config, quantization=quantize, speed=args.speeds.get(cid, config.speed))
        participants.append(Participant(cid, host, cfg, indices=idx.clone(), log_prefix=f"client {cid}: "))
    del parts
    return Worker(participants, host)


def main(argv: list[str] | None = None, ray_trainers: list[Any] | None = None) -> int:
    """``ray_trainers``: Ray actor handles to train on (``simulate.py --engine ray``)."""
    args = parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.log_file:
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    torch.set_num_threads(args.threads)
    raise_open_files(len(args.client_ids) + 64)  # a socket per client, the data files, the pool's pipes
    try:
        worker = build(args, ray_trainers)
    except (DataError, ValueError, RuntimeError) as exc:  # RuntimeError: a training process did not start
        log.error("%s", exc)
        return 2
    n = len(worker.participants)
    samples = sum(p.num_samples for p in worker.participants)
    log.info("hosting %d clients (%s of %d), %d samples (%s split), training on %s, %d torch thread(s) each, "
             "device %s", n, format_ids(args.client_ids), args.num_clients, samples, args.partition,
             f"{len(ray_trainers)} Ray actors" if ray_trainers else
             f"{args.trainers} processes" if args.trainers > 1 else "this process", args.threads,
             worker.host.device)
    return worker.run()


if __name__ == "__main__":
    interrupt_on_sigterm()  # stopped by the launcher: shut the training processes down
    try:
        status = main()
    except KeyboardInterrupt:
        status = 130
    exit_now(status)  # not sys.exit: a hosted client's thread may be inside torch (fl/common/exits.py)
