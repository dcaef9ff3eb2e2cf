"""8-bit quantization (``--quantization``): the difference to the model sent, about 4x
fewer bytes than floats."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fl.client.steps.base import Update, plain_body
from fl.learning.quantization import quantize_state, state_delta


@dataclass(frozen=True)
class Quantize:
    """The body with the 8-bit delta, unless a body exists or an earlier step needs floats."""

    stochastic: bool = False  # unbiased rounding, drawn from the round's generator

    def apply(self, update: Update) -> Update:
        if update.body is not None or not update.quantizable:
            return update
        delta = quantize_state(state_delta(update.local, update.base), stochastic=self.stochastic,
                               generator=update.generator)
        return dataclasses.replace(update, body=plain_body(update, quantized=True, delta=delta))
