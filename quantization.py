"""8-bit quantization of model updates (``client.py --quantization``, ``server.py
--quantize-broadcast``): per-output-channel affine codes, about a quarter of float32's bytes.

Its code is ``fl/learning/quantization.py``. ``python quantization.py [--model NAME]``
quantizes a random update of the model's size and prints the bytes saved and the error.
"""
from __future__ import annotations

import argparse

import torch

from fl.learning import models
from fl.learning.quantization import (
    QuantizationError,
    apply_delta,
    dequantize_state,
    packed_nbytes,
    quantize_state,
    state_delta,
)

__all__ = ["QuantizationError", "apply_delta", "dequantize_state", "packed_nbytes", "quantize_state", "state_delta"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=models.DEFAULT, help=f"{', '.join(models.BUILTIN)} (for MNIST's images)")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    base = models.for_dataset(args.model, "mnist").state_dict()
    local = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    delta = state_delta(local, base)
    packed = quantize_state(delta)
    back = dequantize_state(packed, like=delta)
    err = max(float((back[k] - delta[k]).abs().max()) for k in delta if delta[k].is_floating_point())
    full = sum(v.numel() * v.element_size() for v in delta.values())
    print(f"float32 update {full / 1e6:.2f} MB, 8-bit {packed_nbytes(packed) / 1e6:.2f} MB "
          f"({full / packed_nbytes(packed):.1f}x fewer bytes); largest error {err:.2e} on deltas of std 1e-3")


if __name__ == "__main__":
    main()
