"""A TLS-secured cluster (``distributed.Security``): everything works end to end with the cluster's
certificates, and a client without them cannot reach a worker's handlers."""

from __future__ import annotations

import time
import urllib.request

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.core import rpc
from models import worker_addresses

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine

pytest.importorskip("cryptography")  # Security.temporary() makes its certificates with it
from distributed.security import Security  # noqa: E402

WAIT = 60


def build_sleepy(device="cpu"):
    return _sleepy


def _sleepy(batch):
    """Affine; hangs on a sample whose first value is -1."""
    if (batch[:, 0] == -1).any():
        time.sleep(120)
    return batch * 2 + 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tls_cluster_end_to_end_and_no_handler_without_the_credentials():
    security = Security.temporary()
    with dask.config.set({"dynbatch.benchmark.on-start": False}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, security=security, dashboard_address=":0",
        scheduler_kwargs={"dashboard": True},
    ) as cluster, Client(cluster, security=security) as client:
        assert cluster.scheduler_address.startswith("tls://")
        client.register_plugin(ddb.DynBatchPlugin())
        batcher = ddb.Batcher(client, ddb.ModelSpec("affine", load=build_affine, max_batch_size=64))
        xs = np.random.default_rng(0).random((2_000, 256))  # shipments large enough for shared memory
        results = np.stack([f.result(timeout=WAIT) for f in batcher.map(list(xs))])
        np.testing.assert_array_equal(results, 2 * xs + 1)
        stats = batcher.stats()
        assert stats["delivered"] == 2_000 and stats["failed"] == 0
        workers = stats["workers"]
        assert len(workers) == 2 and all(a.startswith("tls://") for a in workers)
        assert {w["transport"] for w in workers.values()} == {"shared-memory"}  # same host, through TLS too
        assert sum(w["samples"] for w in workers.values()) == 2_000

        state = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state())
        assert set(state["workers"]) == set(workers) and "affine" in state["models"]
        with urllib.request.urlopen(cluster.dashboard_link.replace("/status", "/dynbatch"), timeout=WAIT) as page:
            assert page.status == 200 and b"dynbatch" in page.read().lower()

        address = next(iter(workers))
        stranger = Security.temporary()  # certificates of another cluster

        async def call(connection_args):
            async with rpc(address, connection_args=connection_args, timeout=5) as worker:
                return await worker.dynbatch_server_state()

        # with the cluster's certificates the handler answers ...
        assert [s["name"] for s in client.sync(call, security.get_connection_args("client"))] == ["affine"]
        # ... without them, or with another cluster's, or over plain TCP, nothing reaches it
        with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
            client.sync(call, {})
        with pytest.raises(OSError, match="before comm was established"):  # the handshake fails
            client.sync(call, stranger.get_connection_args("client"))
        with pytest.raises(OSError, match="before comm was established"):
            client.sync(_plain_call, address.replace("tls://", "tcp://"))

        # a stuck batch: the scheduler restarts the worker through its nanny, over TLS
        sleepy = ddb.Batcher(client, ddb.ModelSpec("sleepy", load=build_sleepy, execution_timeout="1s"))
        assert sleepy.submit(np.zeros(2)).result(timeout=WAIT).tolist() == [1.0, 1.0]
        with pytest.raises(ddb.ExecutionTimeoutError, match="alone in its batch"):
            sleepy.submit(np.array([-1.0, 0.0])).result(timeout=WAIT)  # stuck once, then once alone
        assert sleepy.submit(np.ones(2)).result(timeout=WAIT).tolist() == [3.0, 3.0]
        def scheduler_state():
            return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state())

        # the second stuck batch's report (the worker's restart request) may reach the scheduler
        # after the client has the error: wait for it rather than race it
        for _ in range(WAIT * 10):
            state = scheduler_state()
            if state["stuck_batches"].get("sleepy", 0) >= 2:
                break
            time.sleep(0.1)
        assert state["stuck_batches"] == {"sleepy": 2}
        restarted = {r["worker"] for r in state["restarts"]}
        for _ in range(WAIT * 10):  # the nannies bring new worker processes
            workers = worker_addresses(client)  # one look per check, not two moments
            if len(workers) == 2 and not restarted & workers:
                break
            time.sleep(0.1)
        assert len(workers) == 2 and not restarted & workers, (workers, restarted)
        assert all(a.startswith("tls://") for a in workers)
        sleepy.close()
        batcher.close()


async def _plain_call(address):
    async with rpc(address, timeout=5) as worker:
        return await worker.dynbatch_server_state()
