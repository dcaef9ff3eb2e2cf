"""Secure aggregation's encoding: clip, fixed-point encode and mask the float delta, so
the server learns only the sum of the updates (``fl.client.secagg`` runs the stages).

The L2 clip leaves room for rounding (``Settings.l2_target``), so the encoded vector stays
within ``Settings.l2_limit``: the bound the server holds the decoded sum to, |survivors|
times it, refusing the round otherwise. An honest client never trips it."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from fl.client.steps.base import Update
from fl.common.layout import Layout
from fl.common.vectors import clip_by_norm
from fl.secagg import SecAggClient
from fl.secagg.wire import MASKED_INPUT, Settings, encode


class Mask:
    """The masked-input body of one client in one round. ``encoded`` keeps the unmasked
    ring vector for the session's test hooks; 8-bit quantization does not apply (masks
    live in the ring)."""

    def __init__(self, client: SecAggClient, routed: dict[str, Any], settings: Settings, layout: Layout,
                 l2_bound: float | None, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.client, self.routed, self.settings, self.layout = client, routed, settings, layout
        self.l2_bound = l2_bound
        self.log = log
        self.encoded: torch.Tensor | None = None

    def apply(self, update: Update) -> Update:
        s = self.settings
        floats, ints = self.layout.flatten(update.local)
        delta = floats - self.layout.flatten(update.base)[0]
        del floats
        fp = s.fixed_point()
        norm = self.l2_bound
        if norm is not None:
            delta, before = clip_by_norm(delta, s.l2_target(norm))
            if before > norm:
                self.log.debug("round %d: delta norm %.4g clipped to %.4g", update.round, before, norm)
        clipped = fp.clipped(delta)
        if clipped:
            self.log.warning("round %d: %d coordinates of the update exceed the secure-aggregation range "
                             "+-%g and were clipped", update.round, clipped, s.clip)
        self.encoded = x = fp.encode(delta)
        msg = self.client.masked_input(self.routed, x)
        body = encode(MASKED_INPUT, msg, num_samples=update.num_samples, metrics=update.metrics, ints=ints.tolist())
        return dataclasses.replace(update, body=body)
