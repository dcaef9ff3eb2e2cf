"""One client's training settings for a round, and how the training set is cut into the
clients' shards (``Split``): the one place each setting, its default and its check live,
on the server that sends them and on the client that trains with them.

The wire form is a plain dict (``to_wire``/``from_wire``) whose keys and order are the
protocol's: ``mu`` only when FedProx asks for its proximal term, ``dp_clip_norm`` only
under client-side DP clipping, so a client of any age reads what it knows.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

OPTIMIZERS = ("adam", "sgd")
SCHEMES = ("iid", "dirichlet", "shards")  # how ``data.partition`` splits the training set among clients
# what ``--dataset`` names (``datasets.py`` reads each): IDX sets, torchvision's CIFAR batches, a class-folder tree
DATASETS = ("mnist", "fashion-mnist", "kmnist", "emnist-digits", "emnist-mnist", "emnist-letters", "emnist-balanced",
            "emnist-bymerge", "emnist-byclass", "cifar10", "folder")
MAX_SHARDS = 1_000_000  # one per client id (control.MAX_CLIENT_ID + 1)
_AS = {"lr": float, "momentum": float, "mu": float, "dp_clip_norm": float, "optimizer": str,
       "augment": bool, "hflip": bool, "freeze_bn": bool}  # what from_wire makes of a sent value


@dataclass(frozen=True)
class TrainingConfig:
    """What a client trains with in one round; checked on construction (ValueError, one
    line naming the setting), so a bad value never reaches the training loop."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"  # OPTIMIZERS
    momentum: float = 0.0  # SGD's
    augment: bool = True
    hflip: bool = False
    freeze_bn: bool = False  # FixBN: BatchNorm keeps the global statistics
    mu: float | None = None  # FedProx's proximal weight; None: not asked for (0)
    dp_clip_norm: float | None = None  # client-side DP clipping of the delta; None: off

    def __post_init__(self) -> None:
        check(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        """The MODEL message's ``config``: the keys (and their order) servers always sent."""
        wire = {"epochs": self.epochs, "batch_size": self.batch_size, "augment": self.augment, "hflip": self.hflip,
                "optimizer": self.optimizer, "momentum": self.momentum, "freeze_bn": self.freeze_bn, "lr": self.lr}
        if self.mu is not None:
            wire["mu"] = self.mu
        if self.dp_clip_norm is not None:
            wire["dp_clip_norm"] = self.dp_clip_norm
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "TrainingConfig":
        """The config a server sent, checked before any training (ValueError, one line);
        a key an older server does not send takes the value it meant."""
        check(wire)
        given = {f.name: wire[f.name] for f in dataclasses.fields(cls) if f.name in wire}
        return cls(**{k: v if v is None or k not in _AS else _AS[k](v) for k, v in given.items()})

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu for the training loop: 0 (the plain loop) when not asked for."""
        return 0.0 if self.mu is None else self.mu


def check(wire: Mapping[str, Any]) -> None:
    """Refuse a value a client cannot train with: ValueError, one line naming its key."""
    for key in ("epochs", "batch_size"):
        value = wire.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    numbers = {"lr": wire.get("lr"), "momentum": wire.get("momentum", TrainingConfig.momentum),
               "mu": wire.get("mu", 0.0)}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if not numbers["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {numbers['lr']!r}")
    if not 0 <= numbers["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {numbers['momentum']!r}")
    if numbers["mu"] < 0:
        raise ValueError(f"mu must be >= 0, got {numbers['mu']!r}")
    if wire.get("optimizer", TrainingConfig.optimizer) not in OPTIMIZERS:
        raise ValueError(f"unknown client optimizer {wire.get('optimizer')!r}")
    dp = wire.get("dp_clip_norm")
    if dp is not None and (isinstance(dp, bool) or not isinstance(dp, (int, float))
                           or not (math.isfinite(dp) and dp > 0)):
        raise ValueError("dp_clip_norm must be a positive number")


@dataclass(frozen=True)
class Split:
    """How the training set is cut into shards, one per client id (``data.partition``).

    Shards are disjoint only when every client cuts the same way, so the server holds the
    split and sends it in WELCOME to a client that asks (``python client.py`` without
    flags); a client given all of it on its command line (``worker.py``) uses its own.
    Checked on construction: ValueError, one line naming the setting."""

    num_shards: int = 1
    scheme: str = "iid"  # SCHEMES
    alpha: float = 0.5  # Dirichlet concentration (smaller: more label skew)
    seed: int = 0
    dataset: str = "mnist"  # DATASETS: what is cut, so every client cuts the same images
    test_fraction: float = 0.1  # --dataset folder without train/ and test/: the held-out share

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r} (expected one of {', '.join(DATASETS)})")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be a number in (0, 1), got {self.test_fraction!r}")
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) \
                or not 1 <= self.num_shards <= MAX_SHARDS:
            raise ValueError(f"num_shards must be an integer in 1..{MAX_SHARDS}, got {self.num_shards!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partition scheme {self.scheme!r} (expected one of {', '.join(SCHEMES)})")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")

    def to_wire(self) -> dict[str, Any]:
        """WELCOME's ``split``. Control messages carry no floats, so alpha travels as its
        shortest decimal text, which reads back as the same float (the same shards). The
        dataset only when not MNIST, so an MNIST run's WELCOME is what older clients read."""
        wire = {"num_shards": self.num_shards, "scheme": self.scheme, "alpha": repr(float(self.alpha)),
                "seed": self.seed}
        if self.dataset != Split.dataset:
            wire["dataset"] = self.dataset
        if self.dataset == "folder":
            wire["test_fraction"] = repr(float(self.test_fraction))
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "Split":
        """The split a server sent (its shape already checked by the control schema)."""
        numbers = {}
        for key in ("alpha", "test_fraction"):
            try:
                numbers[key] = float(wire.get(key, getattr(cls, key)))
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {wire[key]!r}") from None
        return cls(wire["num_shards"], wire["scheme"], numbers["alpha"], wire["seed"],
                   wire.get("dataset", cls.dataset), numbers["test_fraction"])
