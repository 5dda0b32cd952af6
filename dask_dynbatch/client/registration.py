"""The client's handle on a registered model: its spec, its version, its input signature.

A Batcher registers its spec with the scheduler's model registry: the same name and identity
attaches to the model already there, a different identity is refused
(:class:`~dask_dynbatch.errors.ModelConflictError`) unless replacing. When the model is replaced
(by this or any client) the handle switches to the new version's spec: new shipments name the new
version, and workers retire the old one once its shipments have run.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.protocol.pickle import dumps as pickle_dumps

from ..core.tree import Structure
from ..errors import PluginNotRegisteredError, UnknownModelError
from ..protocol import Registration, raise_if_error
from ..spec import ModelSpec, fingerprint

if TYPE_CHECKING:
    from distributed import Client


def declared_signature(spec: ModelSpec) -> tuple[tuple[int, ...], np.dtype] | None:
    if spec.input_shape is not None and spec.input_dtype is not None:
        return spec.input_shape, np.dtype(spec.input_dtype)
    return None


class RegisteredModel:
    """``spec``, ``version`` and the learned or declared input ``signature`` of one model, as this
    client knows them."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.version = 0
        self.signature: tuple[tuple[int, ...], np.dtype] | Structure | None = declared_signature(spec)
        self._payload = pickle_dumps(spec)
        self._fingerprint, self._described = fingerprint(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    async def register(self, client: Client, replace: bool = False) -> dict[str, dict[str, Any]]:
        """Register (or attach to, or replace) the model; returns the workers able to run it."""
        spec = self.spec
        reply = await client.scheduler.dynbatch_register_model(
            name=spec.name, payload=self._payload, fingerprint=self._fingerprint, described=self._described,
            resources=dict(spec.resources), device=spec.device, client=client.id, replace=replace,
        )
        if reply is None:  # no handler of that name: the plugin is not registered
            raise PluginNotRegisteredError(client.scheduler.address)
        registration = Registration.from_msg(raise_if_error(reply))
        self.version = registration.version
        return registration.workers

    async def refresh(self, client: Client) -> bool:
        """Take the registry's current version (and its spec, when another client replaced it);
        returns whether it changed. A model the scheduler forgot (it restarted) is registered again."""
        try:
            reply = raise_if_error(await client.scheduler.dynbatch_get_model(name=self.name))
        except UnknownModelError:
            await self.register(client)
            return True
        if reply["version"] == self.version:
            return False
        self.switch(pickle.loads(reply["payload"]), reply["version"], reply["payload"])
        return True

    def switch(self, spec: ModelSpec, version: int, payload: bytes) -> None:
        self.spec = spec
        self.version = version
        self._payload = payload
        self._fingerprint, self._described = fingerprint(spec)
        self.signature = declared_signature(spec)  # a new model may take other inputs


async def fetch_spec(client: Client, name: str) -> ModelSpec:
    """The spec registered under ``name`` (for ``Batcher.from_name``)."""
    reply = await client.scheduler.dynbatch_get_model(name=name)
    if reply is None:
        raise PluginNotRegisteredError(client.scheduler.address)
    return pickle.loads(raise_if_error(reply)["payload"])
