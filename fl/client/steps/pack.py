"""Float updates in flat form (``Layout.pack``): a state_dict costs the server about 4x
more to decode."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fl.client.steps.base import Update, plain_body
from fl.common.layout import Layout


@dataclass(frozen=True)
class Pack:
    """The body with the new weights as one flat vector; the last resort of a plain chain.
    A copy of the weights, so the next client may overwrite the model while this is sent."""

    def apply(self, update: Update) -> Update:
        if update.body is not None:
            return update
        flat = Layout.of(update.local).pack(update.local)
        return dataclasses.replace(update, body=plain_body(update, quantized=False, flat=flat))
