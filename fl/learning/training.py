"""Local training and evaluation, read top to bottom like pytorch/examples' mnist/main.py.

Data stays a uint8 tensor on the training device for the whole run; each batch is
gathered, normalised and augmented as one tensor operation, so the loop runs at the speed
of the model rather than of per-sample PIL transforms or DataLoader workers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fl.learning.augment import Augment, augment_batch
from fl.learning.config import OPTIMIZERS, TrainingConfig
from fl.learning.data import to_float


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch (on augmented batches)
    samples: int  # samples processed in all epochs
    seconds: float


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainingConfig, *,
          generator: torch.Generator, progress: bool = True, desc: str = "train",
          augment: Augment = augment_batch) -> TrainResult:
    """Adam (or SGD) from a fresh state each round: optimizer moments from an old global
    model would point the wrong way after aggregation.

    ``config.optimizer == "sgd"`` (with ``momentum``) is the FedAvg paper's client. Its step is
    ``lr`` times the gradient, so as the learning rate decays the mean of the clients'
    updates tends to a step along the mean of their gradients, the global objective's.
    Adam divides each client's gradient by that client's own running scale, so the mean of
    its updates points elsewhere however small ``lr`` gets: on label-skewed shards a weak
    pull (a class the shard lacks) moves a weight as far as a strong one.

    ``mu`` > 0 is FedProx's local objective (Li et al., 2020): the loss minimised is
    cross-entropy + mu/2 * ||w - w_global||^2, w_global a frozen copy of the model's
    parameters (not buffers) at the start of this call. The term's gradient,
    mu * (w - w_global), is added to the gradients after ``backward()`` (two fused calls
    per step) rather than built into the autograd graph: the same update, without the
    graph's cost. The reported loss stays the cross-entropy, comparable across strategies.
    mu = 0 runs the plain loop (no copy, no extra work).

    ``freeze_bn`` is FixBN's calibration phase (Zhong, Chen & Chao, ICML 2024): BatchNorm
    normalises with the global running statistics the model arrived with, and leaves them
    as they are, instead of with the batch's. On a shard of two digits the batch statistics
    are two digits' statistics, so a client would otherwise fit its weights to a
    normalisation the global model never sees at test time. The scales and shifts still
    train; dropout still drops."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    opt = client_optimizer(model.parameters(), config.optimizer, config.lr, config.momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    mu = config.proximal_mu
    proximal = (params, [p.detach().clone() for p in params], mu) if mu > 0 else None
    train_mode(model, config.freeze_bn)
    n = len(labels)
    start = time.perf_counter()
    loss_sum = correct = torch.zeros((), device=device)
    for epoch in range(1, config.epochs + 1):
        loss_sum, correct = train_epoch(model, opt, images, labels, config, generator, proximal,
                                        progress=progress, desc=f"{desc} epoch {epoch}/{config.epochs}",
                                        augment=augment)
    return TrainResult(loss=loss_sum.item() / n, accuracy=correct.item() / n,
                       samples=n * config.epochs, seconds=time.perf_counter() - start)


def train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode, but BatchNorm in eval mode under FixBN (global statistics, kept as they are)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


Proximal = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], float]  # params, anchors, mu


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                config: TrainingConfig, generator: torch.Generator, proximal: Proximal | None, *,
                progress: bool, desc: str, augment: Augment = augment_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the data in the generator's order: (summed loss, correct count) as
    tensors on the device, read once at the end rather than synchronising every step."""
    device = labels.device
    n, batch_size = len(labels), config.batch_size
    steps = math.ceil(n / batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    order = torch.randperm(n, generator=generator).to(device)
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    epoch_start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        x, y = to_float(images[idx]), labels[idx]
        if config.augment:
            x = augment(x, generator, hflip=config.hflip)  # the dataset's; draws on the CPU: same on any device
        out, loss = train_step(model, opt, x, y, proximal)
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if progress and (step % 20 == 19 or step == steps - 1):
            done = min((step + 1) * batch_size, n)
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss_sum.item() / done:.4f}", acc=f"{correct.item() / done:.3f}",
                            ips=f"{done / (time.perf_counter() - epoch_start):.0f}")
    bar.close()
    return loss_sum, correct


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               proximal: Proximal | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; (logits, loss)."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    if proximal is not None:
        add_proximal_gradient(*proximal)
    opt.step()
    return out, loss


def client_optimizer(params: Iterable[torch.Tensor], name: str, lr: float,
                     momentum: float = 0.0) -> torch.optim.Optimizer:
    """The clients' optimizer, named in the round's config. ``momentum`` is SGD's (heavy
    ball, PyTorch's form); Adam keeps its default betas."""
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown client optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedProx's ||w - w_global||^2: the squared L2 distance of ``params`` from ``anchors``
    (differentiable in ``params``; its gradient is 2 (w - w_global))."""
    return torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)]).sum()


@torch.no_grad()
def add_proximal_gradient(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> None:
    """grad += mu * (w - w_global): the gradient of mu/2 * ``proximal_term``, added in place
    after ``backward()``. A parameter without a gradient this step gets none (it has not
    moved from its anchor: Adam skips it)."""
    pairs = [(p, a) for p, a in zip(params, anchors, strict=True) if p.grad is not None]
    if pairs:
        grads = [p.grad for p, _ in pairs]
        torch._foreach_add_(grads, [p for p, _ in pairs], alpha=mu)
        torch._foreach_add_(grads, [a for _, a in pairs], alpha=-mu)


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
