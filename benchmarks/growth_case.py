"""Cost of growth: throughput and latency for 1, 2 and 4 client processes against 1, 2 and 4 workers.

One LocalCluster per worker count (1, 2, 4 worker processes x 1 thread), the plugin registered.
The model sleeps ``8 ms + 125 us per row`` and returns its input (``dask_dynbatch.examples.timed_model``;
float32 rows of 16 values): its cost is simulated, the host CPU free meanwhile, so the two cores
of the CPU machine carry only the package's own work (clients, scheduler, workers) and the model
allows the same throughput on every worker however many there are. ``max_batch_size=64`` (other
settings at their defaults) fixes the device batch, so the ideal is known: each worker runs a batch
of 64 in 16 ms, ``4,000 x workers`` requests/s. Without the bound the controller grows batches
towards the 100 ms target and the ideal would move with it.

Client processes (``multiprocessing``, spawned) each open their own Dask client and Batcher of the
same ModelSpec (the first registers the model, the others attach to it) and warm up with 2,000
requests; they are added one at a time as the client count grows, so that no idle Batcher
is connected. Per combination of workers and clients:

``closed``  every client sends its share of ``--requests`` (``batcher.map``, then every result) at
            once, after one untimed pass of a quarter of that; total requests / (last finish -
            first start), ``--passes`` times; the figure is their mean. This is what the overheads
            cap: with more clients or workers, each request and each shipment costs CPU in more
            processes on the same two cores, and the closed loop shows where that stops the model
            from being kept busy.
``open``    every client sends Poisson arrivals (``common.open_loop``) at its share of 70 % of that
            combination's closed-loop rate for ``--seconds``; p50 and p99 over all clients' requests
            (a closed loop's latencies measure its own queue, not the path: so latency comes from
            the open loop, at the same relative load in every combination).

Also per combination: CPU milliseconds per 1,000 requests of the client processes, the worker
processes and the parent (the scheduler and the nannies run in it) during the closed loops; from
the workers' model servers, in the closed and in the open loop, the mean device batch, the device
batches holding rows of more than one client, and the rows each worker ran; from each client's
``Batcher.history()``, the median of where a shipment's time went.

    python benchmarks/growth_case.py     # writes benchmarks/results/growth_case.{json,png}
    python benchmarks/growth_case.py --requests 4000 --passes 1 --seconds 1 --out /tmp/growth   # smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, open_loop, save, server_states  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch.examples import timed_model  # noqa: E402

MODEL = "growth-sleepy"
FEATURES = 16
FIXED_S, PER_ROW_S, BATCH = 0.008, 0.000125, 64
WORKERS = (1, 2, 4)
CLIENTS = (1, 2, 4)
WARMUP = 2_000
LOAD = 0.7
TIMEOUT = 600.0
#: Batcher.history() fields each client reports the median of, per run (seconds)
SHIPMENT_TIMES = ("queued_s", "stack_s", "round_trip_s", "worker_s", "wait_s", "compute_s")


def model_spec() -> ddb.ModelSpec:
    # LocalCluster names its workers 0, 1, ...: every one runs at the same simulated speed
    load = timed_model({i: PER_ROW_S for i in range(max(WORKERS))}, overhead=FIXED_S)
    return ddb.ModelSpec(MODEL, load=load, max_batch_size=BATCH)


def ideal(workers: int) -> float:
    """Requests/s the simulated model allows: every worker running batches of BATCH back to back."""
    return workers * BATCH / (FIXED_S + PER_ROW_S * BATCH)


# -- the client processes ---------------------------------------------------------------------------
def client_main(address: str, index: int, conn) -> None:
    """One client process: connect, register (or attach to) the model, warm up, then run the
    parent's commands (``closed``, ``open``, ``exit``), answering each with a dict."""
    from distributed import Client

    xs = np.random.default_rng(index).standard_normal((4096, FEATURES)).astype(np.float32)
    samples = list(xs)
    try:
        with Client(address) as client:
            batcher = ddb.Batcher(client, model_spec())
            [f.result(timeout=TIMEOUT) for f in batcher.map(samples[:WARMUP])]
            conn.send({"event": "ready", "pid": os.getpid()})
            while True:
                cmd = conn.recv()
                if cmd["cmd"] == "exit":
                    break
                wall = time.time()
                start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the host
                if cmd["cmd"] == "closed":
                    picks = [i % len(samples) for i in range(cmd["n"])]
                    results = [f.result(timeout=TIMEOUT) for f in batcher.map([samples[i] for i in picks])]
                    end = time.monotonic()
                    got: dict = {"n": cmd["n"], "correct": bool(np.array_equal(np.stack(results), xs[picks]))}
                else:
                    latencies: list[float] = []
                    got = open_loop(batcher, samples, cmd["rate"], cmd["seconds"], seed=cmd["seed"],
                                    latencies_out=latencies)
                    end = time.monotonic()
                    got["latencies"] = latencies
                shipments = [h for h in batcher.history() if h["time"] >= wall]
                conn.send({"event": "done", "start": start, "end": end, **got, "shipments": len(shipments),
                           "mean_shipment": float(np.mean([h["size"] for h in shipments])) if shipments else None,
                           "shipment_ms": {k: float(np.median([h[k] or 0.0 for h in shipments]) * 1e3)
                                           for k in SHIPMENT_TIMES} if shipments else None})
            batcher.close()
    except BaseException as exc:  # the parent waits on the pipe: tell it rather than leave it waiting
        conn.send({"event": "error", "error": repr(exc)})
        raise


class ClientProcess:
    def __init__(self, address: str, index: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=client_main, args=(address, index, child), daemon=True)
        self.proc.start()
        self.ready = self.receive()

    def send(self, **cmd) -> None:
        self.conn.send(cmd)

    def receive(self) -> dict:
        if not self.conn.poll(TIMEOUT):
            raise RuntimeError(f"client process {self.proc.pid} gave no answer in {TIMEOUT:.0f} s")
        message = self.conn.recv()
        if message.get("event") == "error":
            raise RuntimeError(f"client process {self.proc.pid} failed: {message['error']}")
        return message

    def close(self) -> None:
        try:
            self.send(cmd="exit")
        except OSError:
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# -- the parent ---------------------------------------------------------------------------------------
def _pid(dask_worker=None) -> int:
    return os.getpid()


def cpu_seconds(procs: dict) -> dict[str, float]:
    """User + system CPU seconds so far of each role's processes."""
    return {role: sum(sum(p.cpu_times()[:2]) for p in ps) for role, ps in procs.items()}


def server_totals(client) -> dict[str, dict]:
    """Per worker: device batches, rows and shared device batches of the model's newest version."""
    out = {}
    for address, states in server_states(client).items():
        mine = [s for s in states if s["name"] == MODEL]
        if mine:
            s = max(mine, key=lambda s: s["version"])
            out[address] = {k: s[k] for k in ("batches", "samples", "shared_batches")}
    return out


def device_batches(before: dict, after: dict) -> dict:
    """What the workers' model servers did between two ``server_totals``."""
    def delta(address, key):
        return after[address][key] - before.get(address, {}).get(key, 0)

    batches = sum(delta(a, "batches") for a in after)
    shared = sum(delta(a, "shared_batches") for a in after)
    return {"device_batches": batches,
            "mean_device_batch": sum(delta(a, "samples") for a in after) / batches if batches else None,
            # device batches holding rows of more than one client
            "shared_fraction": shared / batches if batches else None,
            "rows_per_worker": [delta(a, "samples") for a in sorted(after)]}


def closed(procs: list[ClientProcess], total: int) -> dict:
    n = total // len(procs)
    for p in procs:
        p.send(cmd="closed", n=n)
    got = [p.receive() for p in procs]
    if not all(g["correct"] for g in got):
        raise AssertionError("wrong results")
    seconds = max(g["end"] for g in got) - min(g["start"] for g in got)
    return {"throughput": n * len(procs) / seconds, "seconds": seconds,
            "shipment_ms": [g["shipment_ms"] for g in got], "mean_shipment": [g["mean_shipment"] for g in got]}


def open_all(procs: list[ClientProcess], total_rate: float, seconds: float, seed: int) -> dict:
    for i, p in enumerate(procs):
        p.send(cmd="open", rate=total_rate / len(procs), seconds=seconds, seed=seed + i)
    got = [p.receive() for p in procs]
    lat = np.concatenate([g.pop("latencies") for g in got]) * 1e3
    return {"offered_rate": total_rate, "achieved_rate": sum(g["achieved_rate"] for g in got),
            "requests": int(lat.size), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "client_p99_ms": [g["p99_ms"] for g in got], "shipment_ms": [g["shipment_ms"] for g in got],
            "mean_shipment": [g["mean_shipment"] for g in got]}


def combination(client, procs: list[ClientProcess], roles: dict, workers: int, args) -> dict:
    clients = len(procs)
    closed(procs, args.requests // 4)  # untimed: placement learns the new client's view of the workers
    before_servers, before_cpu = server_totals(client), cpu_seconds(roles)
    passes = [closed(procs, args.requests) for _ in range(args.passes)]
    after_cpu, after_servers = cpu_seconds(roles), server_totals(client)
    requests = args.requests // clients * clients * len(passes)
    wall = sum(p["seconds"] for p in passes)
    throughput = float(np.mean([p["throughput"] for p in passes]))
    cpu = {role: after_cpu[role] - before_cpu[role] for role in roles}
    out = {
        "workers": workers, "clients": clients, "ideal": ideal(workers),
        "throughput": throughput, "throughputs": [p["throughput"] for p in passes],
        "of_ideal": throughput / ideal(workers),
        "closed_shipment_ms": passes[-1]["shipment_ms"], "closed_mean_shipment": passes[-1]["mean_shipment"],
        "cpu_ms_per_1000": {role: 1e6 * s / requests for role, s in cpu.items()},
        "cpu_cores_busy": sum(cpu.values()) / wall,
        **device_batches(before_servers, after_servers),
    }
    before_servers = server_totals(client)
    out["open"] = open_all(procs, LOAD * throughput, args.seconds, seed=10 * workers + clients)
    out["open"] |= device_batches(before_servers, server_totals(client))
    print(f"{workers} worker(s) x {clients} client(s): {throughput:,.0f} requests/s "
          f"({out['of_ideal']:.0%} of {out['ideal']:,.0f}; passes {', '.join(f'{x:,.0f}' for x in out['throughputs'])}), "
          f"device batches of {out['mean_device_batch'] or 0:.1f}, {out['cpu_cores_busy']:.2f} cores busy, CPU ms per "
          f"1,000: " + ", ".join(f"{r} {v:.0f}" for r, v in out["cpu_ms_per_1000"].items())
          + f"; open loop at {LOAD:.0%} ({out['open']['offered_rate']:,.0f}/s): p50 {out['open']['p50_ms']:.1f} ms, "
          f"p99 {out['open']['p99_ms']:.1f} ms, device batches of {out['open']['mean_device_batch'] or 0:.1f} "
          f"({out['open']['shared_fraction'] or 0:.0%} shared)", flush=True)
    return out


def main(argv=None) -> dict:
    import psutil
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24_000, help="requests of each closed loop, all clients together")
    parser.add_argument("--passes", type=int, default=2, help="timed closed loops per combination")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of each open loop")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG")
    parser.add_argument("--name", default="growth_case")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    result: dict = {
        "machine": machine_stamp(),
        "config": {"requests": args.requests, "passes": args.passes, "open_seconds": args.seconds, "open_load": LOAD,
                   "warmup": WARMUP, "features": FEATURES, "fixed_s": FIXED_S, "per_row_s": PER_ROW_S,
                   "max_batch_size": BATCH,
                   "model": f"time.sleep({FIXED_S} + {PER_ROW_S} * rows), returns its input",
                   "cluster": "LocalCluster, n worker processes x 1 thread"},
        "loadavg_at_start": os.getloadavg(),
        "combinations": [],
    }
    for workers in WORKERS:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            roles = {"clients": [], "workers": [psutil.Process(pid) for pid in client.run(_pid).values()],
                     "scheduler_and_nannies": [psutil.Process()]}
            procs: list[ClientProcess] = []
            try:
                for clients in CLIENTS:
                    while len(procs) < clients:
                        procs.append(ClientProcess(cluster.scheduler_address, len(procs)))
                        roles["clients"].append(psutil.Process(procs[-1].ready["pid"]))
                    result["combinations"].append(combination(client, procs, roles, workers, args))
            finally:
                for p in procs:
                    p.close()
    result["seconds"] = time.perf_counter() - started
    result["loadavg_at_end"] = os.getloadavg()
    path = save(args.name, result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and .png in {result['seconds']:.0f} s", flush=True)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = result["combinations"]
    workers = sorted({c["workers"] for c in combos})
    clients = sorted({c["clients"] for c in combos})
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))

    ax = axes[0]
    ax.plot(workers, [ideal(w) for w in workers], "k--", label="ideal (the simulated model)")
    for i, c in enumerate(clients):
        mine = [x for x in combos if x["clients"] == c]
        ax.plot([x["workers"] for x in mine], [x["throughput"] for x in mine], "o-", color=f"C{i}",
                label=f"{c} client process{'es' if c > 1 else ''}")
    ax.set_xticks(workers)
    ax.set_xlabel("workers (1 thread each)")
    ax.set_ylabel("requests/s, all clients together")
    ax.set_title("closed loop throughput", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    for i, c in enumerate(clients):
        mine = [x for x in combos if x["clients"] == c]
        ax.plot([x["workers"] for x in mine], [x["open"]["p99_ms"] for x in mine], "o-", color=f"C{i}",
                label=f"p99, {c} client{'s' if c > 1 else ''}")
        ax.plot([x["workers"] for x in mine], [x["open"]["p50_ms"] for x in mine], "s--", color=f"C{i}", alpha=0.6,
                label=f"p50, {c} client{'s' if c > 1 else ''}")
    ax.axhline(1e3 * (FIXED_S + PER_ROW_S * BATCH), color="grey", ls=":", label="one full batch of the model")
    ax.set_xticks(workers)
    ax.set_xlabel("workers")
    ax.set_ylabel("request latency, ms")
    ax.set_title(f"open loop (Poisson) at {LOAD:.0%} of each combination's closed loop", fontsize=9)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[2]
    labels = [f"{x['workers']}w x {x['clients']}c" for x in combos]
    bottom = np.zeros(len(combos))
    for role in combos[0]["cpu_ms_per_1000"]:
        values = np.array([x["cpu_ms_per_1000"][role] for x in combos])
        ax.bar(labels, values, bottom=bottom, label=role.replace("_", " "))
        bottom += values
    ax.set_ylabel("CPU ms per 1,000 requests (closed loop)")
    ax.set_title("where the cores go", fontsize=9)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Cost of growth: a model that sleeps {FIXED_S * 1e3:.0f} ms + {PER_ROW_S * 1e6:.0f} us per row, "
                 f"batches of {BATCH}; {m.get('cpu')} x{m.get('cpu_count')}; {m.get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
