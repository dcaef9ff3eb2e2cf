"""UPDATE bodies as a client.py process sends them, for tests and benchmarks that need
one without training (the client's own chain, ``fl.client.steps``, makes them)."""
from __future__ import annotations

from typing import Any

import torch

from fl.client.steps import Update, plain_steps, run_steps


def update_message(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor], round_num: int,
                   num_samples: int, metrics: dict[str, Any], *, quantization: bool = False,
                   stochastic: bool = False, generator: torch.Generator | None = None) -> dict[str, Any]:
    """The UPDATE body of an unclipped update."""
    update = Update(round_num, local, base, num_samples, metrics, generator)
    return run_steps(plain_steps(quantization, stochastic, None), update)
