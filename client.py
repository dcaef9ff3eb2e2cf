"""Federated-learning client: trains the global model on its own shard of the run's dataset.

Each round the server sends the global model and a training config; the client trains
locally with augmentation and sends back its new weights, or with ``--quantization`` the
difference to the global weights in 8 bits per value (about a quarter of the bytes).
Started without ``--client-id`` it is given the lowest free shard by the server, with the
run's data split, so several bare clients train on disjoint shards; it keeps that id when
it reconnects. It connects with retry and backoff, so it can be started before the
server, and it reconnects by itself if the server restarts.

    python client.py [--quantization]
    python client.py --client-id 0 --num-clients 3   # its own split, without asking the server

One process is one client; ``worker.py`` hosts many in one process. Both run the same
``fl.client.participant.Participant``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import ssl
import sys

import torch

from fl.client.config import SPLIT_FLAGS, ClientConfig, check_client_arguments, client_parser, pick_device
from fl.client.host import Host, build_task
from fl.client.participant import Participant, Unreachable, join
from fl.common.logs import setup_logging
from fl.learning import augment, models
from fl.learning.config import Split
from fl.learning.data import MNIST_FILES, DataError, resolve_data_dir, split_shard, subset
from fl.learning.datasets import load_dataset
from fl.wire.errors import RemoteError
from fl.wire.handshake import AuthError, BadWelcome, Mismatch, Terms

log = logging.getLogger("client")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, groups = client_parser("Federated-learning client: trains on its shard of the run's dataset, sends updates to the server.",
                              server_split=True)
    groups["federation"].add_argument("--client-id", type=int, default=None,
                                      help="this client's shard, 0..N-1 (default: the lowest free one, "
                                           "given by the server)")
    args = p.parse_args(argv)
    check_client_arguments(p, args)
    given = [flag for name, flag in SPLIT_FLAGS.items() if getattr(args, _dest(flag)) is not None]
    if args.client_id is None and given:
        p.error(f"{given[0]} needs --client-id: without one the server gives this client its shard and the split")
    if args.client_id is not None and args.client_id < 0:
        p.error(f"--client-id must be >= 0, got {args.client_id}")
    if args.client_id is not None and args.num_clients is not None and args.client_id >= args.num_clients:
        p.error(f"--client-id {args.client_id} is out of range for --num-clients {args.num_clients} "
                f"(valid: 0..{args.num_clients - 1})")
    return args


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def find_shard(args: argparse.Namespace, config: ClientConfig) -> tuple[int, Split, Terms | None]:
    """This client's id, the split it cuts its shard with and what the server trains: its
    own split with --num-clients (no question to the server; the terms come at connecting),
    else the server's with --partition/--alpha/--seed overriding. Raises what
    ``participant.join`` does, or ValueError for a bad override or a --dataset other than
    the server's."""
    if args.num_clients is not None:
        own = {name: getattr(args, _dest(flag)) for name, flag in SPLIT_FLAGS.items()}
        own.update(dataset=args.dataset, test_fraction=args.test_fraction)
        return args.client_id, Split(**{k: v for k, v in own.items() if v is not None}), None
    cid, split, terms = join(config, args.client_id)
    if args.dataset is not None and args.dataset != split.dataset:
        raise ValueError(f"--dataset {args.dataset}: the server trains on {split.dataset}; "
                         f"drop --dataset or give the server --dataset {args.dataset}")
    overrides = {name: getattr(args, _dest(flag)) for name, flag in SPLIT_FLAGS.items() if name != "num_shards"}
    return cid, dataclasses.replace(split, **{k: v for k, v in overrides.items() if v is not None}), terms


def model_name(given: str | None, server: Terms | None) -> str:
    """--model, else the server's when it is a built-in (adopted, as the dataset is), else
    the default. A server's package.module:factory must be given here too: Mismatch."""
    if given is not None or server is None:
        return given or models.DEFAULT
    if server.model not in models.BUILTIN:
        raise Mismatch(f"the server trains --model {server.model}: start this client with --model {server.model} "
                       "(importable here too, e.g. on PYTHONPATH)")
    return server.model


def check_data_dir(args: argparse.Namespace) -> None:
    """Offline, a data folder that is not there fails now, not after asking the server which
    dataset the run trains on: no dataset can be read from it."""
    data_dir = resolve_data_dir(args.data_dir)
    if args.no_download and not data_dir.is_dir():
        raise DataError(f"{data_dir} does not exist and --no-download is given: put the run's dataset there "
                        f"(for MNIST: {', '.join(MNIST_FILES)})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = ClientConfig.from_args(args)
        device = pick_device(args.device)
        if args.model is not None:
            models.factory(args.model)  # a factory that cannot be imported fails before the server is asked
        if args.dataset is not None:
            models.check_trainable(args.dataset, args.model or models.DEFAULT)
        check_data_dir(args)
    except (DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        cid, split, server = find_shard(args, config)
        model, terms = build_task(model_name(args.model, server), split.dataset, resolve_data_dir(args.data_dir))
        if server is not None:
            terms.check(server)  # another model: refused here, before the data is even read
        images, labels = load_dataset(split.dataset, resolve_data_dir(args.data_dir), train=True,
                                      download=not args.no_download, test_fraction=split.test_fraction)
        idx = split_shard(labels, split, cid)
    except (AuthError, RemoteError, ssl.SSLError) as exc:
        log.error("refused: %s", exc)
        return 1
    except (Unreachable, BadWelcome) as exc:
        log.error("%s", exc)
        return 1
    except Mismatch as exc:
        log.error("%s", exc)
        return 2
    except (DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    idx = subset(idx, args.limit, split.seed * 1009 + cid)
    images, labels = images[idx].to(device), labels[idx].to(device)
    torch.manual_seed(split.seed + cid)
    random.seed(split.seed + cid)
    host = Host(images, labels, device, model=model, terms=terms, augment=augment.for_dataset(split.dataset))
    participant = Participant(cid, host, dataclasses.replace(config, seed=split.seed))
    log.info("client %d of %d: %d samples (%s split, alpha %g, seed %d%s) of %s on %s, %s", cid, split.num_shards,
             len(labels), split.scheme, split.alpha, split.seed,
             ", from the server" if args.num_clients is None else "", split.dataset, device,
             models.describe(terms.model, model))
    return participant.run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
