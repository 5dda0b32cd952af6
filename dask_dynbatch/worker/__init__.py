"""The worker half: one model server per loaded (model, version, device), fed by every client,
running device batches in the device's thread."""

from .. import config  # noqa: F401  (registers the dynbatch config defaults)
