"""Sharing: two client processes on one model, against one client alone (target: two clients together
at least 0.9x one; one load per worker; shared device batches; neither client's p99 over 1.5x the other's).

One LocalCluster (1 worker process x 1 thread) with the plugin registered. The model sleeps
``4 ms + 50 us per row`` and returns ``batch + 1`` (float32 rows of 16 values): its cost is the
device's, not the host's, so that the 2 cores of the CPU machine do not decide the outcome.

Two client processes of their own run this file (``--client``), each with its own Dask client and
Batcher of the same spec, its ``load`` defined here, in ``__main__`` (so each pickles it by value): the
first registers the model, the second's registration attaches to it, and both stay connected for the
whole run, so that the worker loads the model once. Contenders, in 3 rounds with the order rotated:

``a``  one client process sends N requests as fast as it can (closed loop: ``batcher.map``, then
       every result); requests/s. The two processes take turns from round to round.
``b``  both processes at once, N requests each; 2 N / (last finish - first start).
``c``  both processes in open loop (Poisson arrivals, ``common.open_loop``), each at 35 % of one
       client's throughput (70 % load together) for 10 s; each client's p50 and p99 latency.

Before the rounds each process runs ``a`` once (untimed: the controller settles; their mean is the
capacity ``c`` offers 35 % of). Per contender, from the worker's model server
(``DynBatchWorkerPlugin.server_states()``): device batches, those holding rows of both clients
(``shared_batches``), and the model's load count. Targets: b / a >= 0.9, one load, larger p99 /
smaller p99 <= 1.5.

    python benchmarks/sharing_case.py          # writes benchmarks/results/sharing_case.{json,png}
    python benchmarks/sharing_case.py --requests 3000 --open-seconds 3 --rounds 1 --out /tmp/sharing   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, open_loop, save, server_state  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

MODEL = "sleepy-shared"
FEATURES = 16
WARMUP = 2_000  # requests each client process sends before it says it is ready
MARK = "@@sharing "  # the client processes' protocol lines on stdout start with this
TIMEOUT = 600.0
#: Batcher.history() columns whose medians each client reports per contender
SHIPMENT_TIMES = ("queued_s", "stack_s", "round_trip_s", "worker_s", "wait_s", "compute_s", "service_s", "latency")


def build_sleepy(device="cpu"):
    """4 ms + 50 us per row of (simulated) device time, the host CPU free meanwhile; ``batch + 1``."""

    def model(batch):
        time.sleep(0.004 + 0.00005 * len(batch))
        return batch + 1

    return model


def model_spec() -> ddb.ModelSpec:
    return ddb.ModelSpec(MODEL, load=build_sleepy)


# -- the client processes ---------------------------------------------------------------------------
def say(**message) -> None:
    print(MARK + json.dumps(message), flush=True)


def client_process(address: str, index: int, n: int) -> None:
    """One client process: connect, register (or attach to) the model, warm up, then run the
    commands the parent sends on stdin, one JSON line each, answering each with one line."""
    from distributed import Client

    xs = np.random.default_rng(index).standard_normal((n, FEATURES)).astype(np.float32)
    samples = list(xs)
    with Client(address) as client:
        batcher = ddb.Batcher(client, model_spec())
        [f.result(timeout=TIMEOUT) for f in batcher.map(samples[:WARMUP])]
        say(event="ready", version=batcher.version, pid=os.getpid(), client=client.id)
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "exit":
                break
            wall = time.time()
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the host
            if cmd["cmd"] == "closed":
                futures = batcher.map(samples[: cmd["n"]])
                results = [f.result(timeout=TIMEOUT) for f in futures]
                end = time.monotonic()
                got = {"n": cmd["n"], "correct": bool(np.array_equal(np.stack(results), xs[: cmd["n"]] + 1))}
            else:
                got = open_loop(batcher, samples, cmd["rate"], cmd["seconds"], seed=cmd["seed"])
                end = time.monotonic()
            shipments = [h for h in batcher.history() if h["time"] >= wall]
            say(event="done", start=start, end=end, **got, shipments=len(shipments),
                mean_shipment=float(np.mean([h["size"] for h in shipments])) if shipments else None,
                mean_device_batch=float(np.mean([h["device_batch"] for h in shipments])) if shipments else None,
                # where a shipment's time went (medians, ms): see Batcher.history()
                shipment_ms={k: float(np.median([h[k] or 0.0 for h in shipments]) * 1e3) for k in SHIPMENT_TIMES}
                if shipments else None)
        batcher.close()


# -- the parent ---------------------------------------------------------------------------------------
class ClientProcess:
    """A client process running this file with ``--client``; its stderr goes to ``log``."""

    def __init__(self, address: str, index: int, n: int, log: Path):
        self.index = index
        self.log = log
        self._stderr = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", address, "--index", str(index),
             "--requests", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._lines.put(json.loads(line[len(MARK):]))
        self._lines.put(None)  # the process ended

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = TIMEOUT) -> dict:
        try:
            message = self._lines.get(timeout=timeout)
        except queue.Empty:
            message = None
        if message is None:
            self._stderr.flush()
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"client process {self.index} gave no answer (exit code {self.proc.poll()}):\n{tail}")
        return message

    def close(self) -> None:
        try:
            self.send(cmd="exit")
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def server_now(client) -> dict:
    """The model's server on the one worker (its state from ``server_states()``)."""
    (state,) = server_state(client, MODEL).values()
    return state


def with_server(client, run) -> dict:
    """Run one contender; add what the worker's model server did meanwhile."""
    before = server_now(client)
    got = run()
    after = server_now(client)
    delta = {k: after[k] - before[k] for k in ("batches", "shared_batches", "samples", "shipments")}
    delta["shared_fraction"] = delta["shared_batches"] / delta["batches"] if delta["batches"] else None
    delta["mean_device_batch"] = delta["samples"] / delta["batches"] if delta["batches"] else None
    controller = after["controller"]
    got["server"] = delta | {"loads": after["loads"], "controller_size": controller["size"],
                             "phase": controller["phase"]}
    return got


def closed(procs: list[ClientProcess], n: int) -> dict:
    """Each process sends ``n`` requests at once; requests/s from the first start to the last finish."""
    for p in procs:
        p.send(cmd="closed", n=n)
    got = [p.receive() for p in procs]
    if not all(g["correct"] for g in got):
        raise AssertionError(f"wrong results: {got}")
    seconds = max(g["end"] for g in got) - min(g["start"] for g in got)
    return {"throughput": n * len(procs) / seconds, "seconds": seconds, "requests": n * len(procs),
            "clients": [g | {"throughput": g["n"] / (g["end"] - g["start"])} for g in got]}


def open_both(procs: list[ClientProcess], rate_each: float, seconds: float, seed: int) -> dict:
    for i, p in enumerate(procs):
        p.send(cmd="open", rate=rate_each, seconds=seconds, seed=seed + i)
    got = [p.receive() for p in procs]
    p99 = [g["p99_ms"] for g in got]
    return {"rate_each": rate_each, "seconds": seconds, "clients": got,
            "p50_ms": [g["p50_ms"] for g in got], "p99_ms": p99, "p99_ratio": max(p99) / min(p99)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="N: requests per client in a closed loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--open-fraction", type=float, default=0.35,
                        help="each client's open-loop rate, as a fraction of one client's throughput")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG")
    parser.add_argument("--name", default="sharing_case")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # a client process
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client_process(args.client, args.index, args.requests)
        return {}

    from distributed import Client, LocalCluster

    n = args.requests
    result: dict = {
        "machine": machine_stamp(),
        "config": {"requests": n, "rounds": args.rounds, "open_seconds": args.open_seconds,
                   "open_fraction": args.open_fraction, "warmup": WARMUP, "features": FEATURES,
                   "model": "time.sleep(0.004 + 0.00005 * rows), returns batch + 1",
                   "spec": "ModelSpec defaults (latency target 100 ms, max_delay 5 ms)",
                   "cluster": "LocalCluster, 1 worker process x 1 thread"},
        "loadavg_at_start": os.getloadavg(),
    }
    started = time.perf_counter()
    logs = Path(tempfile.mkdtemp(prefix="sharing-case-"))
    procs: list[ClientProcess] = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        try:
            for i in range(2):  # the first registers the model, the second attaches to it
                procs.append(ClientProcess(cluster.scheduler_address, i, n, logs / f"client{i}.log"))
                result.setdefault("clients", []).append(procs[-1].receive())
            registry = client.sync(client.scheduler.dynbatch_state)["models"][MODEL]
            result["registry"] = {"version": registry["version"], "clients": len(registry["clients"])}
            print(f"clients ready: {result['clients']}; registry {result['registry']}", flush=True)

            calibration = [with_server(client, lambda p=p: closed([p], n)) for p in procs]
            capacity = float(np.mean([c["throughput"] for c in calibration]))
            result["calibration"] = calibration
            result["capacity"] = capacity
            rate_each = args.open_fraction * capacity
            print(f"one client (untimed pass of each): {[round(c['throughput']) for c in calibration]} "
                  f"requests/s; open loop at {rate_each:.0f} requests/s per client", flush=True)

            names = ["a", "b", "c"]
            rounds = []
            for r in range(args.rounds):
                got = {"order": names[r % 3:] + names[: r % 3]}
                for k in got["order"]:
                    if k == "a":
                        got["a"] = with_server(client, lambda r=r: closed([procs[r % 2]], n)) | {"process": r % 2}
                    elif k == "b":
                        got["b"] = with_server(client, lambda: closed(procs, n))
                    else:
                        got["c"] = with_server(client, lambda r=r: open_both(procs, rate_each, args.open_seconds, 10 * r))
                got["b_over_a"] = got["b"]["throughput"] / got["a"]["throughput"]
                got["p99_ratio"] = got["c"]["p99_ratio"]
                got["loads"] = got["c"]["server"]["loads"]
                rounds.append(got)
                print(f"round {r + 1} ({''.join(got['order'])}): a {got['a']['throughput']:.0f}/s, "
                      f"b {got['b']['throughput']:.0f}/s = {got['b_over_a']:.2f}x (shared batches "
                      f"{got['b']['server']['shared_batches']} of {got['b']['server']['batches']}), "
                      f"c p50 {got['c']['p50_ms'][0]:.1f}/{got['c']['p50_ms'][1]:.1f} ms, "
                      f"p99 {got['c']['p99_ms'][0]:.1f}/{got['c']['p99_ms'][1]:.1f} ms = {got['p99_ratio']:.2f}, "
                      f"loads {got['loads']}", flush=True)
            final = server_now(client)
        finally:
            for p in procs:
                p.close()
    result["rounds"] = rounds
    result["rounds_run"] = len(rounds)
    result["loads"] = final["loads"]
    result["server_final"] = {k: final.get(k) for k in ("batches", "samples", "shipments", "shared_batches",
                                                        "recent_mean_batch", "recent_throughput")} | {
        "controller_size": final["controller"]["size"], "phase": final["controller"]["phase"]}

    def mean(values) -> float:
        return float(np.mean(list(values)))

    a = mean(r["a"]["throughput"] for r in rounds)
    b = mean(r["b"]["throughput"] for r in rounds)
    result["means"] = {
        "a_throughput": a,
        "b_throughput": b,
        "b_over_a": b / a,
        "b_over_a_mean_of_rounds": mean(r["b_over_a"] for r in rounds),
        "b_shared_fraction": mean(r["b"]["server"]["shared_fraction"] or 0.0 for r in rounds),
        "b_mean_device_batch": mean(r["b"]["server"]["mean_device_batch"] for r in rounds),
        "a_mean_device_batch": mean(r["a"]["server"]["mean_device_batch"] for r in rounds),
        "c_p50_ms": [mean(r["c"]["p50_ms"][i] for r in rounds) for i in range(2)],
        "c_p99_ms": [mean(r["c"]["p99_ms"][i] for r in rounds) for i in range(2)],
        "c_shared_fraction": mean(r["c"]["server"]["shared_fraction"] or 0.0 for r in rounds),
        "p99_ratio": mean(r["p99_ratio"] for r in rounds),
    }
    result["targets"] = {"b_over_a >= 0.9": result["means"]["b_over_a"] >= 0.9, "loads == 1": result["loads"] == 1,
                         "p99_ratio <= 1.5": result["means"]["p99_ratio"] <= 1.5}
    result["seconds"] = time.perf_counter() - started
    result["loadavg_at_end"] = os.getloadavg()
    path = save(args.name, result, args.out)
    plot(result, path.with_suffix(".png"))
    print(json.dumps({"means": result["means"], "loads": result["loads"], "targets": result["targets"]}, indent=1),
          flush=True)
    print(f"wrote {path} and .png in {result['seconds']:.0f} s; load average {result['loadavg_at_end']}", flush=True)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, means = result["rounds"], result["means"]
    x = np.arange(len(rounds))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))

    ax = axes[0]
    ax.bar(x - 0.2, [r["a"]["throughput"] for r in rounds], 0.4, label=f"a: one client (mean {means['a_throughput']:,.0f})")
    ax.bar(x + 0.2, [r["b"]["throughput"] for r in rounds], 0.4,
           label=f"b: two clients together (mean {means['b_throughput']:,.0f})")
    for i, r in enumerate(rounds):
        ax.text(i + 0.2, r["b"]["throughput"], f"{r['b_over_a']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"round {i + 1}\n({''.join(r['order'])})" for i, r in enumerate(rounds)])
    ax.set_ylabel("requests/s")
    ax.set_title(f"closed loop, {result['config']['requests']:,} requests per client: b / a = {means['b_over_a']:.2f} "
                 f"(target 0.9)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    for j, (k, label) in enumerate((("a", "a: one client"), ("b", "b: two, closed loop"), ("c", "c: two, open loop"))):
        ax.bar(x + (j - 1) * 0.27, [r[k]["server"]["shared_fraction"] or 0.0 for r in rounds], 0.27, label=label)
        for i, r in enumerate(rounds):
            ax.text(i + (j - 1) * 0.27, (r[k]["server"]["shared_fraction"] or 0.0),
                    f"{r[k]['server']['mean_device_batch']:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"round {i + 1}" for i in range(len(rounds))])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("device batches holding rows of both clients")
    ax.set_title(f"one model server: the model loaded {result['loads']} time(s); "
                 "numbers: mean rows per device batch", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=3)

    ax = axes[2]
    for i in range(2):
        ax.bar(x + (i - 0.5) * 0.4, [r["c"]["p99_ms"][i] for r in rounds], 0.4, alpha=0.85, label=f"client {i} p99")
        ax.plot(x + (i - 0.5) * 0.4, [r["c"]["p50_ms"][i] for r in rounds], "k_", ms=18, mew=2,
                label="p50" if i == 0 else None)
    ax.set_xticks(x, [f"round {i + 1}\n(p99 ratio {r['p99_ratio']:.2f})" for i, r in enumerate(rounds)])
    ax.set_ylabel("request latency ms")
    ax.set_title(f"open loop, each client at {result['config']['open_fraction']:.0%} of one client's throughput "
                 f"({result['rounds'][0]['c']['rate_each']:,.0f}/s), {result['config']['open_seconds']:.0f} s",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower center")
    m = result["machine"]
    fig.suptitle(f"Two client processes on one model (sleep 4 ms + 50 us/row), 1 worker x 1 thread; {m.get('cpu')} "
                 f"x{m.get('cpu_count')}; {m.get('date')}; load average {result['loadavg_at_start'][0]:.1f} at start",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
