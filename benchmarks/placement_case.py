"""Heterogeneous placement: two workers whose speed for the same model differs 3x.

Each worker alone serves 10,000 requests (its own rate); then both together. The proportional
ideal is ``N / (rate_fast + rate_slow)``; the run reports each worker's share against its
throughput share and the makespan against that ideal. The model sleeps in proportion to the batch
(releasing the GIL), so the two speeds do not depend on how busy this 2-core machine is.

    python benchmarks/placement_case.py      # writes benchmarks/results/placement_case.json
    python benchmarks/placement_case.py --requests 2000 --out /tmp/placement   # a smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch.examples import timed_model  # noqa: E402

SECONDS_PER_SAMPLE = {"fast": 0.0001, "slow": 0.0003}
N = 10_000


def run(client, name, n=N, **spec_kw):
    spec = ddb.ModelSpec(name, load=timed_model(SECONDS_PER_SAMPLE), latency_target="200ms", max_batch_size=128, **spec_kw)
    xs = [np.full(1, float(i)) for i in range(n)]
    with ddb.Batcher(client, spec) as batcher:
        [f.result() for f in batcher.map(xs[: min(2000, n)])]  # load, settle the controllers
        before = {a: w["samples"] for a, w in batcher.stats()["workers"].items()}
        started = time.perf_counter()
        out = [f.result() for f in batcher.map(xs)]
        seconds = time.perf_counter() - started
        after = batcher.stats()["workers"]
    assert np.array_equal(np.concatenate(out), np.arange(n, dtype=float))
    served = {after[a]["device"] + "@" + a: after[a]["samples"] - before.get(a, 0) for a in after}
    return {"seconds": seconds, "rate": n / seconds, "served": served,
            "measured_throughput": {a: after[a]["throughput"] for a in after}}


def main(argv=None):
    from distributed import Client, LocalCluster, Nanny

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=N)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON")
    args = parser.parse_args(argv)
    requests = args.requests
    result = {"machine": machine_stamp(), "requests": requests, "seconds_per_sample": SECONDS_PER_SAMPLE}
    cluster = LocalCluster(n_workers=0, processes=True, dashboard_address=":0")
    client = Client(cluster)
    nannies = []
    try:
        client.register_plugin(ddb.DynBatchPlugin())
        for name in ("fast", "slow"):
            nannies.append(cluster.sync(Nanny, cluster.scheduler_address, nthreads=1, name=name, resources={name: 1}))
        client.wait_for_workers(2)
        fast = run(client, "timed-fast", requests, resources={"fast": 1})
        slow = run(client, "timed-slow", requests, resources={"slow": 1})
        both = run(client, "timed-both", requests)
    finally:
        for n in nannies:
            cluster.sync(n.close)
        client.close()
        cluster.close()
    ideal = requests / (fast["rate"] + slow["rate"])
    fast_share_ideal = fast["rate"] / (fast["rate"] + slow["rate"])
    served = list(both["served"].values())
    addresses = list(both["served"])
    fast_addr = next(a for a in addresses if a.split("@")[1] in str(fast["served"]))
    share_fast = both["served"][fast_addr] / requests
    result.update(
        fast_alone=fast, slow_alone=slow, both=both, ideal_seconds=ideal,
        makespan_vs_ideal=both["seconds"] / ideal, fast_share=share_fast, fast_throughput_share=fast_share_ideal,
        share_error=abs(share_fast - fast_share_ideal) / fast_share_ideal, served_total=sum(served),
    )
    print({k: result[k] for k in ("ideal_seconds", "makespan_vs_ideal", "fast_share", "fast_throughput_share", "share_error")})
    save("placement_case", result, args.out)


if __name__ == "__main__":
    main()
