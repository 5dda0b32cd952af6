"""A gated model the tests share: its batches wait until the test opens ``GATE``, which holds
shipments in flight on purpose. Module level, so in-process workers unpickle it by reference."""

from __future__ import annotations

import threading

GATE = threading.Event()


def build_gated(device="cpu"):
    return _gated


def _gated(batch):
    if not GATE.wait(30):
        raise TimeoutError("test gate never opened")
    return batch * 2 + 1

