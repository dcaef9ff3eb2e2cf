"""Federated-learning client: trains the global model on its own MNIST shard.

Each round the server sends the global model and a training config; the client trains
locally with augmentation and sends back its new weights, or with ``--quantization`` the
difference to the global weights in 8 bits per value (about a quarter of the bytes).
It connects with retry and backoff, so it can be started before the server, and it
reconnects by itself if the server restarts.

    python client.py --client-id 0 --num-clients 3 [--quantization]

One process is one client; ``worker.py`` hosts many in one process. Both run the same
``fl.client.participant.Participant``.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys

import torch

from fl.client.config import ClientConfig, check_client_arguments, client_parser, pick_device
from fl.client.host import Host
from fl.client.participant import Participant
from fl.common.logs import setup_logging
from fl.learning.data import DataError, load_mnist, resolve_data_dir, shard, subset

log = logging.getLogger("client")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, groups = client_parser("Federated-learning client: trains on its MNIST shard, sends updates to the server.")
    groups["federation"].add_argument("--client-id", type=int, default=0,
                                      help="this client's index, 0..num-clients-1")
    args = p.parse_args(argv)
    check_client_arguments(p, args)
    if not 0 <= args.client_id < args.num_clients:
        p.error(f"--client-id {args.client_id} is out of range for --num-clients {args.num_clients} "
                f"(valid: 0..{args.num_clients - 1})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = ClientConfig.from_args(args)
        device = pick_device(args.device)
        images, labels = load_mnist(resolve_data_dir(args.data_dir), train=True, download=not args.no_download)
        idx = shard(labels, args.num_clients, args.client_id, args.partition, args.alpha, args.seed)
    except (DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    idx = subset(idx, args.limit, args.seed * 1009 + args.client_id)
    images, labels = images[idx].to(device), labels[idx].to(device)
    torch.manual_seed(args.seed + args.client_id)
    random.seed(args.seed + args.client_id)
    participant = Participant(args.client_id, Host(images, labels, device), config)
    log.info("client %d of %d: %d samples (%s shard) on %s", args.client_id, args.num_clients,
             len(labels), args.partition, device)
    return participant.run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
