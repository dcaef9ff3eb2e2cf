"""Training throughput of the client's real loop against a bare PyTorch loop.

Candidate ("train"): ``training.train`` exactly as ``client.py`` calls it -- uint8 images in,
per-batch gather + ``to_float`` + ``augment_batch`` (default augmentation), loss/accuracy
accumulation, the tqdm progress bar switched on (its output goes to /dev/null here), one
epoch over ``--samples`` images.

Baseline ("bare"): the same ImprovedCNN, batch size, Adam and sample count, but over float
tensors normalised once before timing, taken in order by slicing, with no augmentation,
no metrics and no progress bar -- the fastest a plain loop can go.

Both run with the same ``torch.set_num_threads``. Repetitions alternate bare/train
(ABAB...) inside one invocation so that load from other work on the machine hits both
alike; the figures are medians. Target: train >= 0.85x the bare samples/s.

    python bench/train_speed.py                      # threads 1 and 2
    python bench/train_speed.py --threads 1 --reps 7 --samples 6000
    python bench/train_speed.py --profile            # where the train loop's time goes
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fl.learning.augment import augment_batch  # noqa: E402
from fl.learning.config import TrainingConfig  # noqa: E402
from fl.learning.data import MNIST_FILES, load_mnist, to_float  # noqa: E402
from fl.learning.model import ImprovedCNN  # noqa: E402
from fl.learning.training import train  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
TARGET = 0.85


def load_data(data_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if all((data_dir / f).is_file() for f in MNIST_FILES) or (data_dir / "MNIST" / "raw").is_dir():
        try:
            images, labels = load_mnist(data_dir, train=True, download=False)
            return images[:n].clone(), labels[:n].clone(), f"MNIST from {data_dir}"
        except Exception as exc:  # noqa: BLE001 - fall back to random data below
            print(f"cannot read MNIST from {data_dir} ({exc}); using random data")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels, "random uint8 data"


def fresh_model() -> ImprovedCNN:
    torch.manual_seed(0)
    return ImprovedCNN()


def run_bare(x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float) -> float:
    """Seconds for one epoch of a minimal loop over preloaded float tensors."""
    model = fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(y)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run_train(images: torch.Tensor, labels: torch.Tensor, batch_size: int, lr: float, progress: bool) -> float:
    """Seconds for one epoch of ``training.train`` as the client runs it."""
    model = fresh_model()
    generator = torch.Generator().manual_seed(1)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        start = time.perf_counter()
        train(model, images, labels, TrainingConfig(epochs=1, lr=lr, batch_size=batch_size), generator=generator,
              progress=progress, desc="bench")
        return time.perf_counter() - start


def profile(images: torch.Tensor, labels: torch.Tensor, batch_size: int, lr: float) -> dict[str, float]:
    """Per-step milliseconds of each stage of the train loop, timed one stage at a time."""
    model = fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(1)
    n = len(labels)
    order = torch.randperm(n, generator=g)
    stages = ["gather", "to_float", "augment", "forward+loss", "backward", "optimizer", "metrics", "item() x2"]
    t = {s: 0.0 for s in stages}
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    steps = math.ceil(n / batch_size)
    for step in range(steps):
        t0 = time.perf_counter()
        idx = order[step * batch_size:(step + 1) * batch_size]
        xu, y = images[idx], labels[idx]
        t1 = time.perf_counter()
        x = to_float(xu)
        t2 = time.perf_counter()
        x = augment_batch(x, g)
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        t4 = time.perf_counter()
        loss.backward()
        t5 = time.perf_counter()
        optimizer.step()
        t6 = time.perf_counter()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        t7 = time.perf_counter()
        loss_sum.item(), correct.item()
        t8 = time.perf_counter()
        for s, a, b in zip(stages, (t0, t1, t2, t3, t4, t5, t6, t7), (t1, t2, t3, t4, t5, t6, t7, t8)):
            t[s] += b - a
    return {s: 1000 * v / steps for s, v in t.items()}


def measure(threads: int, images, labels, xf, reps: int, batch_size: int, lr: float) -> dict:
    torch.set_num_threads(threads)
    # Warm up both paths (allocator, oneDNN primitives, first-call overheads).
    run_bare(xf[:batch_size * 8], labels[:batch_size * 8], batch_size, lr)
    run_train(images[:batch_size * 8], labels[:batch_size * 8], batch_size, lr, progress=True)
    n = len(labels)
    bare, real = [], []
    for r in range(reps):
        # ABAB..., starting with the other one every other repetition (ABBA pairs).
        order = ("bare", "train") if r % 2 == 0 else ("train", "bare")
        for which in order:
            if which == "bare":
                bare.append(n / run_bare(xf, labels, batch_size, lr))
            else:
                real.append(n / run_train(images, labels, batch_size, lr, progress=True))
        print(f"  threads {threads} rep {r + 1}/{reps}: bare {bare[-1]:7.0f}/s  train {real[-1]:7.0f}/s"
              f"  ratio {real[-1] / bare[-1]:.3f}", flush=True)
    b, c = statistics.median(bare), statistics.median(real)
    ratios = [c_ / b_ for b_, c_ in zip(bare, real)]
    return {"threads": threads, "bare_samples_per_s": b, "train_samples_per_s": c, "ratio": c / b,
            "ratio_of_pairs_median": statistics.median(ratios), "bare_all": bare, "train_all": real}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="MNIST folder (random uint8 data if absent)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    p.add_argument("--samples", type=int, default=4096, help="samples per repetition (one epoch)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per thread count")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--profile", action="store_true", help="also break one epoch of the train loop into stages")
    a = p.parse_args()

    images, labels, source = load_data(Path(a.data_dir), a.samples)
    xf = to_float(images).contiguous()  # the bare loop's preloaded floats
    print(f"data: {source}, {len(labels)} samples/rep, batch {a.batch_size}, {a.reps} reps, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    results = []
    for threads in a.threads:
        results.append(measure(threads, images, labels, xf, a.reps, a.batch_size, a.lr))
    prof = None
    if a.profile:
        torch.set_num_threads(a.threads[0])
        prof = profile(images, labels, a.batch_size, a.lr)
        total = sum(prof.values())
        print(f"profile of the train loop, threads {a.threads[0]} (ms per step of {a.batch_size}):")
        for s, ms in prof.items():
            print(f"  {s:<14} {ms:7.3f} ms  {100 * ms / total:5.1f}%")
    print()
    for r in results:
        verdict = "OK" if r["ratio"] >= TARGET else "BELOW TARGET"
        print(f"threads {r['threads']}: bare {r['bare_samples_per_s']:.0f} samples/s, train "
              f"{r['train_samples_per_s']:.0f} samples/s, ratio {r['ratio']:.3f} "
              f"(median of per-pair ratios {r['ratio_of_pairs_median']:.3f}; target >= {TARGET}) {verdict}")
    print(json.dumps({"bench": "train_speed", "source": source, "samples_per_rep": len(labels),
                      "batch_size": a.batch_size, "reps": a.reps, "target_ratio": TARGET,
                      "results": [{k: (round(v, 4) if isinstance(v, float) else
                                       [round(x, 1) for x in v] if isinstance(v, list) else v)
                                   for k, v in r.items()} for r in results],
                      "profile_ms_per_step": prof}))


if __name__ == "__main__":
    main()
