"""Where does time go on the GPU data path? Transport alone, transport + staging, and the whole
dask-dynbatch path at fixed batch sizes, with py-spy profiles of the client and the worker.

    python benchmarks/gpu_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from distributed import Client, LocalCluster
from distributed.protocol import to_serialize

import dask_dynbatch as ddb
import dask_dynbatch.client as dclient
from dask_dynbatch.examples import build_resnet50, resnet_images


class FixedSize:
    """Stands in for the controller: always the same size (to map throughput against size)."""

    def __init__(self, target, initial_size=8, max_size=None, **kw):
        self.size = max_size

    def observe(self, *a):
        return self.size

    def set_cap(self, cap):
        pass

    def state(self):
        return {"size": self.size, "reason": "fixed"}


def echo_handler_setup(dask_worker):
    async def sink(batch=None, stage=False):
        if stage:
            import torch

            torch.from_numpy(batch).pin_memory().to("cuda", non_blocking=True)
            torch.cuda.synchronize()
        return {"n": len(batch)}

    dask_worker.handlers["probe_sink"] = sink


def transport(client, addr, images, n, stage, inflight):
    import asyncio

    async def run():
        sem = asyncio.Semaphore(inflight)

        async def one():
            async with sem:
                await client.rpc(addr).probe_sink(batch=to_serialize(images[:n]), stage=stage)

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(40)])
        return 40 * n / (time.perf_counter() - t0)

    return client.sync(run)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    res = {}
    images = resnet_images(512)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        client.run(echo_handler_setup)
        addr = next(iter(client.scheduler_info()["workers"]))
        for stage in (False, True):
            for n in (64, 256, 512):
                res[f"transport_stage{int(stage)}_{n}"] = transport(client, addr, images, n, stage, 3)
                print(f"transport stage={stage} n={n}: {res[f'transport_stage{int(stage)}_{n}']:.0f} img/s", flush=True)
        (wpid,) = client.run(os.getpid).values()
        dclient.BatchSizeController = FixedSize
        samples = [images[i % 512] for i in range(20000)]
        for inflight in (3, 6):
            for n in (64, 256, 512):
                spec = ddb.ModelSpec(f"r50-{n}-{inflight}", load=build_resnet50, max_batch_size=n, max_inflight=inflight)
                with ddb.Batcher(client, spec) as b:
                    [f.result() for f in b.map(samples[:2048])]
                    prof = None
                    if n == 256 and inflight == 3:
                        prof = [subprocess.Popen(["py-spy", "record", "--format", "raw", "-d", "4", "-r", "200", "-o",
                                                  str(out / f"{who}.txt"), "--pid", str(pid)] + (["--threads"] if who == "worker" else []),
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                                for who, pid in (("worker", wpid), ("client", os.getpid()))]
                    t0 = time.perf_counter()
                    [f.result() for f in b.map(samples)]
                    rate = len(samples) / (time.perf_counter() - t0)
                    if prof:
                        for p in prof:
                            p.wait(timeout=30)
                    res[f"dynbatch_fixed_{n}_inflight{inflight}"] = rate
                    print(f"dynbatch fixed {n} inflight {inflight}: {rate:.0f} img/s", flush=True)
    (out / "gpu_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
