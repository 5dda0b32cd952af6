"""Models several test modules use (module level, so in-process workers unpickle them by
reference): a gated model, whose batches wait until the test opens ``GATE`` (it holds shipments in
flight on purpose), and a poisoned one; :func:`worker_addresses`, the cluster's workers in one look;
and :class:`Deliveries`, how often each future resolved."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

GATE = threading.Event()


class Deliveries:
    """Counts how often each future resolves (exactly once, or the test fails); ``then`` runs once,
    from the callback that brings the count of resolutions to ``at`` (a worker killed mid-run)."""

    def __init__(self, at: int | None = None, then: Callable[[], None] | None = None):
        self.counts: Counter[int] = Counter()
        self.watched: list = []
        self.lock = threading.Lock()
        self.at, self.then = at, then
        self.fired = threading.Event()

    def watch(self, futures):
        start = len(self.watched)
        self.watched.extend(futures)
        for i, f in enumerate(futures, start):
            f.add_done_callback(lambda f, i=i: self._done(i))
        return futures

    def exactly_once(self) -> bool:
        return len(self.counts) == len(self.watched) and set(self.counts.values()) == {1}

    def _done(self, i):
        with self.lock:
            self.counts[i] += 1
            fire = self.then is not None and sum(self.counts.values()) == self.at and not self.fired.is_set()
            if fire:
                self.fired.set()
        if fire:
            self.then()


def build_gated(device="cpu"):
    return _gated


def _gated(batch):
    if not GATE.wait(30):
        raise TimeoutError("test gate never opened")
    return batch * 2 + 1


def build_poisoned(device="cpu"):
    """Affine model that raises on any batch holding a sample whose first value is negative."""

    def model(batch):
        if (batch[:, 0] < 0).any():
            raise ValueError("poison sample")
        return batch * 2 + 1

    return model


def worker_addresses(client) -> set[str]:
    """The scheduler's workers now, in one look. ``client.scheduler_info()`` returns the client's
    cached view, which the client's periodic refresh may replace by one listing no workers between
    the update and the read."""
    return client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.workers))


def build_gated_encoder(device="cpu"):
    """A dict model of padded token ids (per-token features and a pooled sum); a batch holding a
    row whose first token is 999 waits for the shared gate."""

    def model(input_ids, attention_mask):
        if (input_ids[:, 0] == 999).any() and not GATE.wait(30):
            raise TimeoutError("test gate never opened")
        hidden = input_ids[..., None] * np.arange(1.0, 4.0) + attention_mask[..., None]
        return {"last_hidden_state": hidden, "pooler_output": (hidden * attention_mask[..., None]).sum(axis=1)}

    return model


def build_slow_encoder(device="cpu"):
    """A dict model of padded token ids that takes 2 ms a batch (per-token features and a pooled sum)."""
    import time

    def model(input_ids, attention_mask):
        time.sleep(0.002)
        hidden = input_ids[..., None] * np.arange(1.0, 4.0) + attention_mask[..., None]
        return {"last_hidden_state": hidden, "pooler_output": (hidden * attention_mask[..., None]).sum(axis=1)}

    return model
