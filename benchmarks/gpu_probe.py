"""Where does time go on the GPU data path? The Dask comm alone (a batch sent to a bare worker
handler, with and without staging it to the GPU), then the whole dask-dynbatch path with the batch
size pinned at 64/256/512 and 3 or 6 shipments in flight (throughput against size, which the
closed loops of gpu_case.py, where the controller picks the size, do not map), with py-spy
profiles of the client and the worker at 256 x 3.

The size is pinned through the spec: ``initial_batch_size = max_batch_size = n`` (the model server's
controller starts at the top and cannot grow) and a latency target of a minute (no batch is late, so
it never shrinks). Until the rebuild the client's controller was swapped for a fixed-size stand-in.

    python benchmarks/gpu_probe.py --out DIR
    DYNBATCH_SMOKE=1 python benchmarks/gpu_probe.py --out /tmp/probe --requests 2000   # CPU smoke test:
        the tiny CNN instead of ResNet-50, no staging to a GPU, no profiles without py-spy
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
from dask_dynbatch.examples import build_resnet50, resnet_images

if os.environ.get("DYNBATCH_SMOKE"):  # a CPU smoke test of this script: the tiny CNN instead
    from dask_dynbatch.examples import build_tiny_cnn as build_resnet50  # noqa: F811
    from dask_dynbatch.examples import tiny_cnn_images as resnet_images  # noqa: F811


def echo_handler_setup(dask_worker):
    async def sink(batch=None, stage=False):
        if stage:
            import torch

            torch.from_numpy(batch).pin_memory().to("cuda", non_blocking=True)
            torch.cuda.synchronize()
        return {"n": len(batch)}

    dask_worker.handlers["probe_sink"] = sink


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


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


def profile(out: Path, pids: dict[str, int]) -> list[subprocess.Popen]:
    """py-spy of each process for 4 s (none where py-spy is not installed)."""
    try:
        return [subprocess.Popen(["py-spy", "record", "--format", "raw", "-d", "4", "-r", "200", "-o",
                                  str(out / f"{who}.txt"), "--pid", str(pid)] + (["--threads"] if who == "worker" else []),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                for who, pid in pids.items()]
    except OSError as exc:
        print("no profile:", exc, flush=True)
        return []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per pinned-size run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    images = resnet_images(512)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        client.run(echo_handler_setup)
        addr = next(iter(client.scheduler_info()["workers"]))
        stages = (False, True) if any(client.run(_has_cuda).values()) else (False,)
        for stage in stages:
            for n in (64, 256, 512):
                res[f"transport_stage{int(stage)}_{n}"] = transport(client, addr, images, n, stage, 3)
                print(f"transport stage={stage} n={n}: {res[f'transport_stage{int(stage)}_{n}']:.0f} img/s", flush=True)
        (wpid,) = client.run(os.getpid).values()
        samples = [images[i % 512] for i in range(args.requests)]
        for inflight in (3, 6):
            for n in (64, 256, 512):
                spec = ddb.ModelSpec(f"r50-{n}-{inflight}", load=build_resnet50, max_batch_size=n, initial_batch_size=n,
                                     latency_target="60s", max_inflight=inflight)
                with ddb.Batcher(client, spec) as b:
                    [f.result() for f in b.map(samples[:2048])]
                    prof = profile(out, {"worker": wpid, "client": os.getpid()}) if n == 256 and inflight == 3 else []
                    t0 = time.perf_counter()
                    [f.result() for f in b.map(samples)]
                    rate = len(samples) / (time.perf_counter() - t0)
                    for p in prof:
                        p.wait(timeout=30)
                    (worker,) = b.stats()["workers"].values()
                res[f"dynbatch_fixed_{n}_inflight{inflight}"] = rate
                res[f"dynbatch_fixed_{n}_inflight{inflight}_controller_size"] = worker["controller"]["size"]
                print(f"dynbatch fixed {n} inflight {inflight}: {rate:.0f} img/s (server's size "
                      f"{worker['controller']['size']})", flush=True)
    (out / "gpu_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
