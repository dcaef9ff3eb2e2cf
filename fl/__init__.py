"""The federated-learning system behind ``server.py`` and ``client.py``.

Sub-packages by layer, lowest first; a module imports only from its own layer or below
(``LAYERS``; ``tests/test_structure.py`` holds the code to it):

- ``common``: pure helpers (a state's flat layout, vector math, logs, process limits);
- ``wire``: bytes between peers (frames, control messages, the safe decoder, handshake, TLS);
- ``learning``: the model, the data, local training and 8-bit quantization;
- ``strategies``, ``secagg``: aggregation algorithms; ``privacy``: DP wrappers around a strategy;
- ``client``, ``server``: the two sides, which never import each other.
"""

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"common"}),
    frozenset({"wire", "learning"}),
    frozenset({"strategies", "secagg"}),
    frozenset({"privacy"}),
    frozenset({"client", "server"}),
)
