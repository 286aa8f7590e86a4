"""FedAvg round bookkeeping of the cloud: the weights each round has received, and when a round is due.

:class:`~splitedge.runtime_cloud.server.CloudServer` checks a WEIGHTS message and hands its
weights to :meth:`FedAvgRounds.add`; :meth:`FedAvgRounds.due` yields each round that is complete,
averaged (weighted by the clients' sample counts), for the server to send back.
"""

from __future__ import annotations

import time
from typing import Any
from collections.abc import Iterator, Mapping

import numpy as np

from ..export import manifest as mf


class FedAvgRounds:
    def __init__(self, param_names: Any, expect_clients: int, client_timeout_s: float):
        self.names = sorted(param_names)
        self.expect_clients = expect_clients
        self.client_timeout_s = client_timeout_s
        self.pending: dict[int, dict[int, tuple[dict[str, np.ndarray], int]]] = {}  # round -> client -> (weights, samples)
        self.pending_since: dict[int, float] = {}  # round -> when its first weights arrived

    def add(self, rnd: int, client_id: int, weights: dict[str, np.ndarray], samples: int) -> None:
        self.pending.setdefault(rnd, {})[client_id] = (weights, max(1, samples))
        self.pending_since.setdefault(rnd, time.monotonic())

    def waiting(self) -> set[int]:
        """The clients whose weights wait in a round not averaged yet."""
        return {cid for got in self.pending.values() for cid in got}

    def due(self, by_client: Mapping[int, Any]) -> Iterator[tuple[int, list[int], dict[str, np.ndarray], int]]:
        """(round, its clients, the average, their samples) of every pending round that no active client still owes.

        A client owes round r if it has not sent weights for r, neither now nor in an earlier
        average of r (a client that joined late, or came back, averages with the others from
        the next round on). While fewer than --expect-clients clients have joined, rounds wait
        for them, at most --client-timeout after their first weights arrived. ``by_client``: the
        sessions by client id (``active`` and ``fedavg_round`` are read).
        """
        now = time.monotonic()
        for rnd in sorted(self.pending):
            got = self.pending[rnd]
            owing = [c for c, x in by_client.items() if x.active and c not in got and x.fedavg_round < rnd]
            waiting_for_joiners = (
                self.expect_clients and len(by_client) < self.expect_clients
                and now - self.pending_since.get(rnd, now) < self.client_timeout_s
            )
            if not got or owing or waiting_for_joiners:
                continue
            total = sum(n for _, n in got.values())
            names = self.names
            avg = {k: np.sum([w[k].astype(np.float64) * (n / total) for w, n in got.values()], axis=0).astype(np.float32)
                   for k in names}
            del self.pending[rnd]
            self.pending_since.pop(rnd, None)
            yield rnd, sorted(got), avg, total


def client_param_shapes(m: mf.Manifest) -> dict[str, tuple[int, ...]]:
    """The edge half's parameters that WEIGHTS carry (trainable and frozen), with their shapes."""
    from ..export import split, zoo

    client, _ = split.split(m.model, zoo.build(m.model, m.num_classes, m.input_shape[0]), m.cut)
    names = set(m.trainable_params) | set(m.frozen_params)
    return {k: tuple(v.shape) for k, v in client.state_dict().items() if k in names}
