"""The cluster's model registry: one entry per model name, its version, and who uses it (pure).

A model is registered once per cluster under its name. A second registration of the same name
with the same identity (the spec's fingerprint, :func:`dask_dynbatch.spec.fingerprint`) attaches
to it: same version, same loaded model on every worker. The same name with a different identity is
a :class:`~dask_dynbatch.errors.ModelConflictError` naming what differs, unless the registration
asks to replace it: then the version goes up, new shipments load the new version, and workers
retire the old one once what they hold of it has run. A model no connected client uses any more
is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelConflictError, UnknownModelError
from ..protocol import ModelSuperseded


@dataclass
class ModelEntry:
    """One registered model: its current ``version`` and what it was registered with."""

    name: str
    version: int
    payload: bytes  # the pickled ModelSpec workers load
    fingerprint: dict[str, str]  # identity field -> token
    described: dict[str, str]  # identity field -> words, for error messages
    resources: dict[str, float]
    device: str | None
    clients: set[str] = field(default_factory=set)  # connected clients with a Batcher of it
    registered: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        """JSON-able, without the payload."""
        return {"name": self.name, "version": self.version, "resources": dict(self.resources), "device": self.device,
                "clients": sorted(self.clients), "registered": self.registered}


class ModelRegistry:
    """Models by name (see the module docstring)."""

    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}

    def register(self, name: str, payload: bytes, fingerprint: dict[str, str], described: dict[str, str], *,
                 resources: dict[str, float] | None = None, device: str | None = None, client: str | None = None,
                 replace: bool = False) -> tuple[ModelEntry, bool]:
        """Register ``name`` for ``client``; returns the entry and whether it attached to an
        existing registration of the same identity (False: new, or a replacement)."""
        entry = self.models.get(name)
        if entry is not None and entry.fingerprint == fingerprint:
            if client is not None:
                entry.clients.add(client)
            return entry, True
        if entry is not None and not replace:
            raise ModelConflictError(name, self.differences(entry, fingerprint, described))
        version = entry.version + 1 if entry is not None else 1
        clients = set(entry.clients) if entry is not None else set()
        if client is not None:
            clients.add(client)
        self.models[name] = new = ModelEntry(name, version, payload, dict(fingerprint), dict(described),
                                             dict(resources or {}), device, clients)
        return new, False

    @staticmethod
    def differences(entry: ModelEntry, fingerprint: dict[str, str], described: dict[str, str]) -> dict[str, tuple[str, str]]:
        """Field -> (registered, given) for every identity field that differs."""
        fields = sorted(set(entry.fingerprint) | set(fingerprint))
        return {f: (entry.described.get(f, "?"), described.get(f, "?"))
                for f in fields if entry.fingerprint.get(f) != fingerprint.get(f)}

    def get(self, name: str, version: int | None = None) -> ModelEntry:
        """The entry of ``name``; with ``version``, that version or :class:`ModelSuperseded`."""
        entry = self.models.get(name)
        if entry is None:
            raise UnknownModelError(name, list(self.models))
        if version is not None and version != entry.version:
            raise ModelSuperseded(name, entry.version)
        return entry

    def remove_client(self, client: str) -> list[str]:
        """``client`` left: returns the names no connected client uses any more (dropped)."""
        unused = []
        for name, entry in list(self.models.items()):
            if client in entry.clients:
                entry.clients.discard(client)
                if not entry.clients:
                    del self.models[name]
                    unused.append(name)
        return unused

    def uses(self, client: str) -> bool:
        return any(client in entry.clients for entry in self.models.values())

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: entry.summary() for name, entry in self.models.items()}
