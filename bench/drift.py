"""What one round of local training on two-digit shards costs a trained global model.

Loads a checkpoint written in the FedAvg paper's non-IID setting (``scale.py paper
--partition shards``), then:

- ``stats``: test accuracy with the checkpoint's averaged BatchNorm statistics, and with
  statistics recomputed over all 60,000 training images (a centralised reference the
  federation cannot compute): if the averaged statistics were the problem, the second
  would be much higher;
- ``drift``: for each client learning rate, R rounds of 10 clients drawn from the 100
  pathological shards, each trained E=5, B=10 from the checkpoint (``local.fit``,
  the clients' own training), their models averaged; the accuracy of each average, and of
  the average of the R averages (what a server learning rate below 1 approaches).

    python bench/drift.py /tmp/flbench-XXXX/checkpoint.pt --lr 1e-4 1e-5 --repeats 3

No sockets: the aggregation here is the plain mean of equal-sized shards (FedAvg's).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repo: bench/secagg.py is not the package
from common import DEFAULT_DATA  # noqa: E402

from fl.client.local import fit  # noqa: E402
from fl.common.layout import Layout  # noqa: E402
from fl.learning.config import TrainingConfig  # noqa: E402
from fl.learning.data import load_mnist, partition, to_float  # noqa: E402
from fl.learning.model import ImprovedCNN  # noqa: E402
from fl.learning.training import OPTIMIZERS, evaluate  # noqa: E402
from fl.server import checkpoint  # noqa: E402

State = dict[str, torch.Tensor]


def mean_state(states: list[State]) -> State:
    layout = Layout.of(states[0])  # equal shards: the plain mean (counters rounded, as the server does)
    flat = [layout.flatten(s) for s in states]
    floats = torch.stack([f for f, _ in flat]).double().mean(0).float()
    ints = torch.stack([i for _, i in flat]).double().mean(0).round().long()
    return layout.unflatten(floats, ints)


def accuracy(state: State, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    model = ImprovedCNN()
    model.load_state_dict(state)
    return evaluate(model, *test)[1]


@torch.no_grad()
def recomputed_statistics(state: State, images: torch.Tensor) -> State:
    """The same weights with BatchNorm statistics over ``images`` (cumulative average)."""
    model = ImprovedCNN()
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(images), 500):
        model.features(to_float(images[i:i + 500]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-5])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="the clients' optimizer")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD's momentum")
    p.add_argument("--freeze-bn", action="store_true", help="FixBN: clients normalise with the global statistics")
    p.add_argument("--repeats", type=int, default=1, help="rounds per learning rate")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    a = p.parse_args()
    torch.set_num_threads(1)
    base = checkpoint.load(a.checkpoint)["model"]
    images, labels = load_mnist(a.data_dir, train=True, download=False)
    test = load_mnist(a.data_dir, train=False, download=False)
    shards = partition(labels, 100, "shards", seed=0)
    out = {"averaged_statistics": accuracy(base, test),
           "recomputed_statistics": accuracy(recomputed_statistics(base, images), test)}
    print(f"averaged BatchNorm statistics {100 * out['averaged_statistics']:.2f}%, "
          f"recomputed over the training set {100 * out['recomputed_statistics']:.2f}%", flush=True)
    model = ImprovedCNN()
    for lr in a.lr:
        config = TrainingConfig(epochs=5, lr=lr, batch_size=10, augment=True, optimizer=a.optimizer,
                                momentum=a.momentum, freeze_bn=a.freeze_bn)
        rounds = []
        for r in range(a.repeats):
            sample = random.Random(r).sample(range(100), 10)
            rounds.append(mean_state([fit(model, images, labels, shards[c], c, 0, 151 + r, config, base)[0]
                                      for c in sample]))
            print(f"lr {lr:g} round {r + 1}: {100 * accuracy(rounds[-1], test):.2f}%", flush=True)
        out[f"lr {lr:g}"] = [accuracy(s, test) for s in rounds]
        if len(rounds) > 1:
            out[f"lr {lr:g} mean of rounds"] = accuracy(mean_state(rounds), test)
            print(f"lr {lr:g} mean of the {len(rounds)} rounds' models: {100 * out[f'lr {lr:g} mean of rounds']:.2f}%")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
