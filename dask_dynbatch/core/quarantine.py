"""Requests whose worker died under them, or whose batch got stuck: retried in ever smaller groups
until the one that kills workers is alone (pure: no dask).

A worker that dies with a shipment (a segfault in an extension, a CUDA illegal address,
``os._exit``), or whose model server declares a device batch stuck and is restarted, takes the
requests of that shipment with it, and any of them may be the cause. They are not sent again as
one batch: they are cut in halves, and each half goes out as a shipment of its own, which the
worker runs as a device batch of its own, on a worker of this client that runs nothing else
meanwhile. The half without the culprit is delivered; the other dies again and is cut again, so
after about log2(n) deaths the culprit is alone. A request that dies alone, having died before,
fails; every batchmate is delivered.

The bound: a request makes its worker die at most ``max_deaths`` times. Groups are cut small
enough that the culprit of a group is alone before that bound: a group cut after ``d`` deaths
holds at most ``2 ** (max_deaths - d - 1)`` requests.

A block part (:mod:`~dask_dynbatch.core.blocks`) is one request here, however many rows it holds:
its rows share one future, so it is retried and fails as a unit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

#: deaths a request may cause by default (dynbatch.quarantine.max-restarts)
MAX_DEATHS = 10


class Quarantine:
    """Groups of suspects waiting to run alone, first in first out.

    Each request's ``attempts`` counts the shipments it was in that were lost with their worker
    (or declared stuck). Not thread-safe: the dispatcher uses it from the client's event loop.
    """

    def __init__(self, max_deaths: int = MAX_DEATHS):
        if max_deaths < 2:
            raise ValueError(f"max_deaths must be at least 2 (one death, then one alone), not {max_deaths!r}")
        self.max_deaths = int(max_deaths)
        self._groups: deque[list[Any]] = deque()
        self._rows = 0

    def __len__(self) -> int:
        """Rows waiting (including ones resolved meanwhile, dropped when their group is taken)."""
        return self._rows

    def lost(self, reqs: Sequence[Any]) -> list[Any]:
        """The requests of one lost shipment (its worker died, or the batch was declared stuck,
        with these rows in it). Returns the ones that fail now: the request was alone and had died
        before, or it reached ``max_deaths``; the others wait here in groups."""
        reqs = [r for r in reqs if not r.future.done()]
        for req in reqs:
            req.attempts += 1
        alone = len(reqs) == 1
        failed = [r for r in reqs if (alone and r.attempts >= 2) or r.attempts >= self.max_deaths]
        if failed:
            reqs = [r for r in reqs if r not in failed] if not alone else []
        if reqs:
            deaths = max(r.attempts for r in reqs)
            size = min(math.ceil(len(reqs) / 2), 2 ** max(0, self.max_deaths - deaths - 1))
            for start in range(0, len(reqs), size):
                self.put_back(reqs[start:start + size])
        return failed

    def put_back(self, group: Iterable[Any]) -> None:
        """A group that did not run (its worker was restarting): it keeps its turn and its members."""
        group = list(group)
        if group:
            self._groups.append(group)
            self._rows += sum(r.rows for r in group)

    def pop(self) -> list[Any]:
        """The next group still holding unresolved requests (an empty list: none waits)."""
        while self._groups:
            group = self._groups.popleft()
            self._rows -= sum(r.rows for r in group)
            group = [r for r in group if not r.future.done()]  # timed out while they waited
            if group:
                return group
        return []

    def drain(self) -> list[Any]:
        """Remove and return every waiting request."""
        out = [r for group in self._groups for r in group]
        self._groups.clear()
        self._rows = 0
        return out
