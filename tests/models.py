"""Models several test modules use (module level, so in-process workers unpickle them by
reference): a gated model, whose batches wait until the test opens ``GATE`` (it holds shipments in
flight on purpose), and a poisoned one; and :func:`worker_addresses`, the cluster's workers in one look."""

from __future__ import annotations

import threading

import numpy as np

GATE = threading.Event()


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
