"""One client's local training in a round, wherever it runs (the host's training thread,
a ``TrainerPool`` process, a Ray actor): seeded from (seed, client id, round) alone, so
the same client trains identically in any process and in any order; and, when a secure
aggregation round is retried, from the attempt too (see :func:`round_seed`)."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from fl.learning.augment import Augment, augment_batch
from fl.learning.config import TrainingConfig
from fl.learning.training import TrainResult, train

Fitted = tuple[dict[str, torch.Tensor], Any, torch.Generator, int]  # local state, TrainResult, generator, samples


def round_seed(seed: int, client_id: int, round_num: int, attempt: int = 0) -> int:
    """Seed of one client's training in one round: the same whether the client is a
    process of its own or one of many in a worker, and whatever order a worker trains in.

    A retried attempt of a secure-aggregation round (``attempt`` > 0) trains from another
    seed: with the same model and seed a retry would send the same update again, and the
    server, which may learn the sums of two attempts over different survivors, would learn
    their difference, a single client's update. Attempt 0 keeps the historical seed."""
    if attempt == 0:
        return seed * 100_003 + client_id * 1009 + round_num
    digest = hashlib.sha256(f"fl-train/{seed}/{client_id}/{round_num}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # manual_seed takes a non-negative int64


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None,
        client_id: int, seed: int, round_num: int, config: TrainingConfig, base: dict[str, torch.Tensor],
        progress: bool = False, attempt: int = 0, augment: Augment = augment_batch) -> Fitted:
    """One client's local training from ``base``: (a copy of the local state, the training
    result, the round's generator, the sample count). The generator goes on to the update
    steps: stochastic rounding draws from it."""
    model.load_state_dict(base)
    rs = round_seed(seed, client_id, round_num, attempt)
    generator = torch.Generator().manual_seed(rs)
    torch.manual_seed(rs + 1_000_000_007)  # dropout draws from the global generator
    if indices is not None:
        images, labels = images[indices], labels[indices]
    result = train(model, images, labels, config, generator=generator, progress=progress, desc=f"round {round_num}",
                   augment=augment)
    # A copy even on the CPU (where .cpu() would alias the model's own tensors): the next
    # client trained on this model must not change what this one returns.
    local = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return local, result, generator, len(labels)


def straggle_seconds(speed: float, train_seconds: float) -> float:
    """How long a client with slowdown ``speed`` waits after training for ``train_seconds``,
    so that its training takes ``speed`` times as long in real time. A sleep rather than
    slower training: the cores stay free, so one machine can host many slow clients."""
    return max(0.0, (speed - 1.0) * train_seconds)


def train_metrics(result: TrainResult) -> dict[str, float]:
    """The metrics an update carries to the server (the server logs and plots them)."""
    return {"loss": result.loss, "accuracy": result.accuracy, "train_s": result.seconds,
            "samples_per_s": result.samples / max(result.seconds, 1e-9)}


def log_round(log: logging.Logger | logging.LoggerAdapter, round_num: int, result: TrainResult, sent: str) -> None:
    """The one line a client logs per round, plain or secure: ``sent`` says what went out."""
    log.info("round %d: loss %.4f acc %.2f%% | %.1f s, %.0f img/s | %s", round_num, result.loss,
             100 * result.accuracy, result.seconds, result.samples / max(result.seconds, 1e-9), sent)
