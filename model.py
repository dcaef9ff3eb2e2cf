"""The global model every participant trains: ImprovedCNN, a two-block CNN for 28x28 digits.

Its code is ``fl/learning/model.py``. ``python model.py`` prints its layers and size.
"""
from __future__ import annotations

import argparse

from fl.common.layout import Layout
from fl.learning.model import ImprovedCNN, count_parameters

__all__ = ["ImprovedCNN", "count_parameters"]


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    model = ImprovedCNN()
    layout = Layout.of(model.state_dict())
    print(model)
    print(f"{count_parameters(model):,} parameters; the state travels as {layout.float_numel:,} float32 "
          f"values and {layout.int_numel} integer counters ({4 * layout.float_numel / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
