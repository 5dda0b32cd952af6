"""Entry point of the child process that warms inductor's caches for one bucket
(:func:`dask_dynbatch.worker.compile.warm_in_subprocess` starts it)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from ..core.tree import Batch
from .compile import compile_shape, compile_static
from .model import LoadedModel


def main(job_path: str) -> None:
    job = pickle.loads(Path(job_path).read_bytes())
    spec = pickle.loads(job["payload"])
    loaded = LoadedModel(spec, job["device"])  # the eager model, as the worker has it
    compiled = compile_static(loaded.model, loaded.spec.compile_mode() or "default", 1)
    if isinstance(job["template"], Batch):  # structured samples: the warm-up batch itself, staged as the worker stages
        batch = job["template"].map(loaded.as_input)
    else:
        batch = loaded.as_input(np.repeat(job["template"], job["bucket"], axis=0))
    compile_shape(loaded.forward, compiled, batch)


if __name__ == "__main__":
    main(sys.argv[1])
