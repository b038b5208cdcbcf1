"""The exchange between workers, in torch: the protocol adapters call (``exchange(h)``,
``start``/``finish``, ``reduce``, declared row kinds) and what serves it.

Modules: ``protocol`` (what adapters see: :class:`Exchange`, :class:`GraphTopology`,
:class:`RowDeclarer`, :class:`StructureRejected`), ``comm`` (the communicator: halo rows
between peers, differentiable), ``overlap`` (an exchange in flight while the model works),
``transport`` (point-to-point with a timeout, host-staged where gloo needs it), ``checkpoint``
(activation checkpointing that replays exchanges), ``ghost`` (the ghost baseline's exchange).
Adapters import the protocol names from here (``from distmlip.exchange import Exchange``).
"""

from distmlip.exchange.protocol import (
    Exchange,
    GraphTopology,
    RowDeclarer,
    RowExchange,
    RowLayout,
    StructureRejected,
    sum_into,
    undirected_edge_keys,
)

__all__ = [
    "StructureRejected",
    "GraphTopology",
    "RowLayout",
    "RowDeclarer",
    "Exchange",
    "RowExchange",
    "undirected_edge_keys",
    "sum_into",
]
