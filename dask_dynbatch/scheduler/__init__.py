"""The scheduler half: the plugin, the model registry, the dashboard page and the Prometheus series."""

from .. import config  # noqa: F401  (registers the dynbatch config defaults)
