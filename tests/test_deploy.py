"""Deployment as the README describes it: the CLI with ``--preload dask_dynbatch``, and the README's
quickstart run as a script."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_cli_scheduler_with_the_preload_serves_a_model(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--preload", "dask_dynbatch", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    try:
        for _ in range(300):
            if scheduler_file.exists() and scheduler_file.stat().st_size:
                break
            time.sleep(0.1)
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                       "--preload", "dask_dynbatch",  # accepted on workers too (does nothing more)
                                       "--nthreads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            batcher = ddb.Batcher(client, ddb.ModelSpec("affine", load=build_affine))  # no register_plugin here
            results = [f.result(timeout=60) for f in batcher.map([np.full(3, float(i)) for i in range(50)])]
            assert [r[0] for r in results] == [2.0 * i + 1 for i in range(50)]
            batcher.close()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_a_script(tmp_path):
    pytest.importorskip("torch")  # the quickstart serves the tiny CNN
    text = README.read_text()
    (snippet,) = re.findall(r"```python\n(import numpy as np\n.*?)```", text, flags=re.S)
    script = tmp_path / "quickstart.py"
    script.write_text(snippet)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "1001"  # one submit and 1,000 in map, all delivered
