"""FedAvg (temporary)."""
from __future__ import annotations

from strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
