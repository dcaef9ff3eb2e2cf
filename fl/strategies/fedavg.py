"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS): the next global model is the weighted mean of the clients'
models, i.e.

    x_{t+1} = x_t + sum_i w_i Delta_i / sum_i w_i        Delta_i = x_i - x_t (client i's delta)

with w_i the client's sample count (or 1 under ``--weighting uniform``: the server's call).
This is :class:`Strategy`'s own behaviour; the class only gives it a name.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fl.strategies.base import Strategy


@dataclasses.dataclass
class FedAvg(Strategy):
    name: ClassVar[str] = "fedavg"
