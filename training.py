"""Local training and evaluation, read top to bottom like pytorch/examples' mnist/main.py.

Data stays a uint8 tensor on the training device for the whole run; each batch is
gathered, normalised and augmented as one tensor operation, so the loop runs at the speed
of the model rather than of per-sample PIL transforms or DataLoader workers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from augment import augment_batch
from data import to_float


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch (on augmented batches)
    samples: int  # samples processed in all epochs
    seconds: float


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = True,
    hflip: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Adam from a fresh state each round: optimizer moments from an old global model
    would point the wrong way after aggregation."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(labels)
    steps = math.ceil(n / batch_size)
    start = time.perf_counter()
    loss_sum = correct = torch.zeros((), device=device)
    for epoch in range(1, epochs + 1):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(n, generator=generator).to(device)
        bar = tqdm(total=n, desc=f"{desc} epoch {epoch}/{epochs}", unit="img", leave=False,
                   disable=not progress, dynamic_ncols=True)
        epoch_start = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x, y = to_float(images[idx]), labels[idx]
            if augment:
                x = augment_batch(x, generator, hflip=hflip)  # draws on the CPU: same on any device
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            if progress and (step % 20 == 19 or step == steps - 1):
                done = min((step + 1) * batch_size, n)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{loss_sum.item() / done:.4f}", acc=f"{correct.item() / done:.3f}",
                                ips=f"{done / (time.perf_counter() - epoch_start):.0f}")
        bar.close()
    return TrainResult(loss=loss_sum.item() / n, accuracy=correct.item() / n,
                       samples=n * epochs, seconds=time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 images.

    By default batches of 16 on the CPU: faster there than large batches (the activations
    stay in cache) and ~2 MB of activations instead of ~250 MB at 1000, which matters to a
    server evaluating while it receives updates. On a GPU, batches of 1000."""
    device = next(model.parameters()).device
    batch_size = batch_size or (16 if device.type == "cpu" else 1000)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(labels), batch_size):
        x = to_float(images[i:i + batch_size].to(device))
        y = labels[i:i + batch_size].to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train(was_training)
    return loss_sum / len(labels), correct / len(labels)


def round_lr(base_lr: float, round_num: int, total_rounds: int, schedule: str = "cosine",
             floor: float = 0.1) -> float:
    """Learning rate the server hands out for a round: cosine from ``base_lr`` down to
    ``floor * base_lr`` at the last round, or constant."""
    if schedule == "constant" or total_rounds <= 1:
        return base_lr
    t = (round_num - 1) / (total_rounds - 1)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
