"""The client half: the :class:`~dask_dynbatch.client.batcher.Batcher` users call, the dispatcher
that turns its queue into messages to workers, the transport, and the feedback from replies."""

from .. import config  # noqa: F401  (registers the dynbatch config defaults)
