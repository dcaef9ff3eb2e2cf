"""Own images against the IDX files: the same MNIST images federated twice by the real
launcher, once as a class-folder tree of PNGs (``--dataset folder``) and once as IDX files.

The first ``--train`` training and ``--test`` test images of MNIST are written both ways
(PNG per image in ``train/<digit>/`` and ``test/<digit>/``; the four IDX files in MNIST's
order), then ``simulate.py`` runs each with the same clients, rounds, seed and limits and
the final accuracies are compared. The folder lists its images by class, so the two runs
cut different IID shards of the same images: the gap is the run-to-run spread of the split.

    python bench/folder.py                                   # 3 clients, 3 rounds, 3000/500 images
    python bench/folder.py --train 60000 --test 10000 --limit 0
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import DEFAULT_DATA, run_simulation  # noqa: E402

from fl.learning.data import load_mnist, write_idx  # noqa: E402


def export(mnist: Path, root: Path, train: int, test: int) -> tuple[Path, Path]:
    """The PNG tree and the IDX folder of the same images."""
    pngs, idx = root / "png", root / "idx"
    idx.mkdir(parents=True)
    for part, is_train, n, prefix in (("train", True, train, "train"), ("test", False, test, "t10k")):
        images, labels = load_mnist(mnist, train=is_train, download=False)
        images, labels = images[:n], labels[:n]
        write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", labels.to(images.dtype))
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = pngs / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:05d}.png")
    return pngs, idx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train", type=int, default=3000, help="training images exported (of 60,000)")
    p.add_argument("--test", type=int, default=500, help="test images exported (of 10,000)")
    p.add_argument("--limit", type=int, default=600, help="samples each client trains on (0: its whole shard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flbench-folder-"))
    pngs, idx = export(Path(a.data_dir), root, a.train, a.test)
    common = ["--clients", str(a.clients), "--rounds", str(a.rounds), "--seed", str(a.seed),
              *(["--limit", str(a.limit)] if a.limit else [])]
    runs = {"folder": run_simulation([*common, "--dataset", "folder", "--data-dir", str(pngs)]),
            "idx": run_simulation([*common, "--dataset", "mnist", "--data-dir", str(idx)])}
    for name, r in runs.items():
        acc = [m["accuracy"] for m in r["metrics"]]
        print(f"{name:>6}: accuracy by round {' '.join(f'{100 * x:.2f}%' for x in acc)}; wall {r['wall_s']:.0f} s")
    gap = runs["folder"]["metrics"][-1]["accuracy"] - runs["idx"]["metrics"][-1]["accuracy"]
    print(f"final accuracy, folder - idx: {100 * gap:+.2f} pp")
    print(json.dumps({"args": vars(a), "gap_pp": 100 * gap, "data": str(root),
                      **{name: {"accuracy": [m["accuracy"] for m in r["metrics"]], "wall_s": r["wall_s"],
                                "run": r["out"]} for name, r in runs.items()}}))


if __name__ == "__main__":
    main()
