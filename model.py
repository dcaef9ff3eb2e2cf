"""The global model every participant trains: ``--model`` picks a built-in (ImprovedCNN, a
two-block CNN for small images, by default) or a user's package.module:factory.

The models are ``fl/learning/models/``. ``python model.py [--model NAME --dataset NAME]``
prints the model's layers and size.
"""
from __future__ import annotations

import argparse
import sys

from fl.common.layout import Layout
from fl.learning import models
from fl.learning.config import DATASETS, Split
from fl.learning.model import ImprovedCNN, count_parameters

__all__ = ["ImprovedCNN", "count_parameters"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=models.DEFAULT,
                   help=f"{', '.join(models.BUILTIN)}, or package.module:factory (importable: on PYTHONPATH)")
    p.add_argument("--dataset", choices=DATASETS, default=Split.dataset, metavar="NAME",
                   help="the images it is built for: " + ", ".join(DATASETS) + " (folder: 1x28x28, 2 classes)")
    args = p.parse_args(argv)
    try:
        model = models.for_dataset(args.model, args.dataset)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = Layout.of(model.state_dict())
    print(model)
    print(f"{args.model} for {args.dataset}: {count_parameters(model):,} parameters; the state travels as "
          f"{layout.float_numel:,} float32 values and {layout.int_numel} integer counters "
          f"({4 * layout.float_numel / 1e6:.2f} MB), layout {layout.fingerprint:016x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
