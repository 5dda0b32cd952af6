"""Defaults of the ``dynbatch`` section of Dask's configuration (``dynbatch.yaml`` beside this file).

Set them like any Dask option: ``dask.config.set({"dynbatch.memory-budget": 0.5})``, a YAML file,
or environment variables such as ``DASK_DYNBATCH__MEMORY_BUDGET=0.5`` on a worker.
"""

from __future__ import annotations

import os

import dask.config
import yaml

with open(os.path.join(os.path.dirname(__file__), "dynbatch.yaml")) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)
