"""The server's settings, built once from the command line and read everywhere else.

A frozen dataclass rather than an ``argparse.Namespace``: the round logic, the transport
and the evaluator each read the fields they need, nobody can change one mid-run, and a
test builds one with only the fields it cares about. Credentials are not in here: they
live in the transport's key ring and never reach a checkpoint or a log.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fl.learning.config import Split, TrainingConfig
from fl.strategies.staleness import STALENESS_RULES

MNIST_TRAIN_SIZE = 60_000
MODES = ("sync", "async")
MIN_SHARDS = 3  # without --num-shards: room for three bare clients (simulate.py's default) however small --min-clients


@dataclass(frozen=True)
class ServerConfig:
    # network
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str | None = None
    tls_key: str | None = None
    max_connections: int = 1100  # authenticated sessions
    max_pending: int = 64  # connections still in their handshake, all addresses together
    max_pending_per_address: int = 8
    max_frame_mb: int = 8
    handshake_timeout: float = 10.0
    # federation
    rounds: int = 3  # as simulate.py's quickstart
    target_accuracy: float | None = None  # stop once a round's test accuracy reaches this
    min_clients: int = 2
    min_fit: int = 1
    fraction: float = 1.0
    round_timeout: float = 600.0
    max_attempts: int = 10  # a round that fails this many times in a row stops the run (exit status 1)
    quantize_broadcast: bool = False
    training: TrainingConfig = field(default_factory=TrainingConfig)  # round 1's; lr is the schedule's start
    lr_schedule: str = "cosine"
    freeze_bn_after: int | None = None  # FixBN: from the next round on, BatchNorm uses the global statistics
    seed: int = 0  # also the data split's
    # asynchronous aggregation (FedBuff, server/asynchronous.py): --rounds then counts server steps
    mode: str = "sync"
    concurrency: int = 10  # clients training at once
    buffer_size: int = 10  # accepted updates per server step
    staleness_weight: str = "polynomial"  # polynomial: (1 + staleness)^-0.5; constant: 1
    max_staleness: int | None = None  # None: no limit
    # the data split told to joining clients (learning/config.py's Split)
    num_shards: int | None = None  # None: max(min_clients, MIN_SHARDS)
    partition: str = Split.scheme
    alpha: float = Split.alpha
    dataset: str = Split.dataset  # learning/datasets.py reads it, here the test set, on the clients their shards
    test_fraction: float = Split.test_fraction
    # aggregation
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    weighting: str = "samples"
    clip_norm: float | None = None
    max_samples: int = MNIST_TRAIN_SIZE
    norm_ratio: float | None = 4.0  # None: no screening of update norms
    screen_hold: int = 11  # reports the norm screen holds: robust to fewer than half of them colluding
    # differential privacy (privacy/): on when dp_noise_multiplier is set
    dp_noise_multiplier: float | None = None
    dp_clipping: str = "server"
    dp_adaptive: bool = False
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_delta: float | None = None  # None: 1 / N^1.1
    dp_population: int | None = None  # N for the accountant; None: --min-clients
    target_epsilon: float | None = None
    dp_seed: int | None = None  # None: noise seeded from the OS CSPRNG
    # secure aggregation (secagg_server.py): the server learns only the sum of the updates
    secure_aggregation: bool = False
    secagg_threshold: int | None = None  # None: max(2, ceil(2g/3)) for groups of g clients
    secagg_neighbours: int | None = None  # SecAgg+ group size (odd); None: every sampled client
    secagg_clip: float = 8.0  # fixed-point range per coordinate: [-clip, clip]
    secagg_bits: int = 32  # the ring Z_{2^bits}
    secagg_stage_timeout: float = 60.0  # seconds for each stage but the masked input's
    # data and output
    data_dir: str | None = None
    download: bool = True
    test_limit: int | None = None
    checkpoint: str = "checkpoint.pt"
    resume: bool = False
    overwrite: bool = False  # start afresh where a previous run's files are (outputs.py)
    metrics: str = "metrics.jsonl"
    tensorboard: str = ""  # a folder for every round's scalars as TensorBoard event files (tensorboard.py); "": none
    threads: int | None = None
    quiet: bool = False
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        problem = self.async_problem()
        if problem:
            raise ValueError(problem)

    def async_problem(self) -> str | None:
        """The one line that refuses the asynchronous settings, or None when they are usable."""
        if self.mode not in MODES:
            return f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}"
        if self.concurrency < 1 or self.buffer_size < 1:
            return f"--concurrency and --buffer-size must be at least 1, got {self.concurrency} and {self.buffer_size}"
        if self.staleness_weight not in STALENESS_RULES:
            return f"--staleness-weight must be one of {', '.join(STALENESS_RULES)}, got {self.staleness_weight!r}"
        if self.max_staleness is not None and self.max_staleness < 0:
            return f"--max-staleness must be >= 0, got {self.max_staleness}"
        if self.mode == "sync":
            return None
        return self._async_composition()

    def _async_composition(self) -> str | None:
        """What --mode async cannot be combined with, each with its reason."""
        if self.secure_aggregation:
            return ("--mode async cannot use --secure-aggregation: its key stages need a round's clients to take "
                    "part together, and an async buffer's updates arrive one by one, trained from different versions")
        if self.fraction != 1.0:
            return ("--fraction samples a synchronous round; with --mode async, --concurrency sets how many "
                    "train at once")
        if self.buffer_size > self.min_clients:
            return (f"--buffer-size {self.buffer_size} needs --min-clients >= {self.buffer_size}: a buffer holds "
                    "at most one update per client")
        if self.min_fit > self.buffer_size:
            return f"--min-fit {self.min_fit} cannot exceed --buffer-size {self.buffer_size}"
        if self.staleness_weight == "polynomial" and self.dp:
            return ("--staleness-weight polynomial cannot scale updates under DP, whose clipping would undo it and "
                    "whose mean counts every update 1/K: use --staleness-weight constant (and --max-staleness)")
        if self.dp_adaptive and self.dp_clipping == "client":
            return ("--mode async cannot use --dp-adaptive with --dp-clipping client: the clip norm moves every step "
                    "while clients still train with an older one, whose updates would then be refused")
        return None

    @property
    def asynchronous(self) -> bool:
        return self.mode == "async"

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier is not None

    def split(self) -> Split:
        """How the training set is cut into the clients' shards; ValueError for a bad setting."""
        return Split(self.num_shards or max(self.min_clients, MIN_SHARDS), self.partition, self.alpha, self.seed,
                     self.dataset, self.test_fraction)

    def bn_frozen(self, round_num: int) -> bool:
        """Whether BatchNorm's statistics are fixed in this round (FixBN's calibration phase)."""
        return self.freeze_bn_after is not None and round_num > self.freeze_bn_after

    def training_config(self, round_num: int = 1) -> TrainingConfig:
        """What every client is told in a round, besides the round's learning rate and the
        strategy's keys (``fit_config``)."""
        return dataclasses.replace(self.training, freeze_bn=self.bn_frozen(round_num))

    def public(self) -> dict[str, Any]:
        """The settings as plain JSON-able values, for the checkpoint (no credentials here);
        the training settings under the flat keys checkpoints have always had."""
        t = self.training
        flat = {"local_epochs": t.epochs, "lr": t.lr, "client_optimizer": t.optimizer,
                "client_momentum": t.momentum, "batch_size": t.batch_size, "augment": t.augment, "hflip": t.hflip}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "training"}
        return {k: v for k, v in {**flat, **fields}.items()
                if isinstance(v, (int, float, str, bool, dict)) or v is None}
