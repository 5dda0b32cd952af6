"""Load test: nothing lost under malformed input, poison requests, cancellations and a worker restart.

Rounds of requests through one Batcher on a LocalCluster of worker processes. In every round 1 %
of the requests are malformed (wrong shape, wrong dtype, not an array: ``submit`` must refuse them),
0.2 % are poison (the model raises on any batch that holds one: they must fail alone), 1 % are
cancelled right after ``submit``; in the first round one worker is restarted by its nanny halfway.
Checked per round: delivered + failed + cancelled == submitted, exactly the bad requests failed,
every delivered value is right, queues are empty at the end (the Batcher's queue, its batches in
flight, the workers' memory reservations). Across rounds: the workers' resident memory.

    python benchmarks/load_test.py                       # 5 rounds x 20,000 = 100,000 requests
    python benchmarks/load_test.py --rounds 3 --per-round 2000 --out load_test_quick

Writes ``benchmarks/results/<out>.json`` with the machine stamp. ``tests/test_robustness.py`` runs
:func:`run_load_test` scaled down.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dask  # noqa: E402
from common import machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

FEATURES = 64
GOOD, MALFORMED, POISON = 0, 1, 2


def build_poison_affine(device: str = "cpu"):
    """``2 x + 1``; raises on any batch holding a sample whose first value is negative."""
    return _poison_affine


def _poison_affine(batch):
    if (batch[:, 0] < 0).any():
        raise ValueError("poison sample")
    return batch * 2 + 1


def _malformed(kind: int, sample: np.ndarray):
    """Something ``submit`` must refuse: wrong shape, wrong dtype, or not a numeric array."""
    return [sample[:-1], sample.astype(np.float64), "not an array", None, {"x": sample}][kind % 5]


def _worker_rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def _python_objects() -> int:
    """Objects the garbage collector tracks: a leak of per-request or per-batch state shows here
    even when the allocator hides it from RSS."""
    gc.collect()
    return len(gc.get_objects())


def _worker_reservations(dask_worker=None) -> int:
    ext = dask_worker.extensions.get("dynbatch")
    return sum(sizer.state()["in_flight"] for sizer in ext.sizers.values()) if ext is not None else 0


def _settle(predicate, timeout: float = 10.0) -> None:
    """The last batch's bookkeeping runs just after its futures resolve: give it a moment."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def run_round(client, batcher, n: int, rng: np.random.Generator, *, restart: bool = False,
              malformed: float = 0.01, poison: float = 0.002, cancel: float = 0.01,
              chunk: int = 500, timeout: float = 600) -> dict:
    """One round of ``n`` requests; returns its counts and checks (see the module docstring)."""
    kinds = rng.choice(3, size=n, p=[1 - malformed - poison, malformed, poison])
    xs = rng.standard_normal((n, FEATURES)).astype(np.float32)
    xs[:, 0] = np.abs(xs[:, 0])
    xs[kinds == POISON, 0] = -1.0
    futures: dict[int, ddb.RequestFuture] = {}
    malformed_rejected = 0
    unexpected_submit_errors: list[str] = []
    resolved = [0]
    lock = threading.Lock()
    halfway = threading.Event()
    restarted: list = []

    def on_done(_):
        with lock:
            resolved[0] += 1
            if resolved[0] >= n // 2:
                halfway.set()

    def restart_one() -> None:
        halfway.wait(timeout)
        victim = sorted(client.scheduler_info()["workers"])[0]
        started = time.perf_counter()
        client.restart_workers([victim])
        restarted.append({"worker": victim, "seconds": time.perf_counter() - started})

    restarter = threading.Thread(target=restart_one, daemon=True) if restart else None
    if restarter is not None:
        restarter.start()
    started = time.perf_counter()
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        ok = rows[kinds[rows] != MALFORMED]
        for i, future in zip(ok, batcher.map(list(xs[ok]))):
            futures[int(i)] = future
            future.add_done_callback(on_done)
        for i in rows[kinds[rows] == MALFORMED]:
            try:
                batcher.submit(_malformed(int(i), xs[i]))
            except ddb.InputSignatureError:
                malformed_rejected += 1
            except Exception as exc:  # counted as a failure of the check below
                unexpected_submit_errors.append(repr(exc))
        for i in rng.choice(ok, size=int(round(cancel * len(ok))), replace=False):
            futures[int(i)].cancel()
    submit_s = time.perf_counter() - started
    _, not_done = concurrent.futures.wait(list(futures.values()), timeout=timeout)
    elapsed = time.perf_counter() - started
    if restarter is not None:
        halfway.set()
        restarter.join(timeout)

    delivered = failed = cancelled = poison_delivered = wrong_values = 0
    unexpected_failures: list[str] = []
    good_rows, good_values = [], []
    for i, future in futures.items():
        if not future.done():
            continue
        if future.cancelled():
            cancelled += 1
        elif future.exception() is not None:
            failed += 1
            if kinds[i] != POISON or "poison sample" not in str(future.exception()):
                unexpected_failures.append(f"{i}: {future.exception()!r}")
        else:
            delivered += 1
            if kinds[i] == POISON:
                poison_delivered += 1
            else:
                good_rows.append(i)
                good_values.append(future.result())
    if good_rows:
        wrong_values = int((~np.all(np.stack(good_values) == 2 * xs[good_rows] + 1, axis=1)).sum())
    _settle(lambda: batcher.stats()["in_flight"] == 0 and batcher.stats()["queued"] == 0)
    _settle(lambda: sum(client.run(_worker_reservations).values()) == 0)
    stats = batcher.stats()
    return {
        "submitted": n,
        "delivered": delivered,
        "failed": failed + malformed_rejected,
        "cancelled": cancelled,
        "unresolved": len(not_done),
        "malformed": int((kinds == MALFORMED).sum()),
        "malformed_rejected": malformed_rejected,
        "poison": int((kinds == POISON).sum()),
        "poison_failed": sum(1 for i, f in futures.items() if kinds[i] == POISON and f.done()
                             and not f.cancelled() and f.exception() is not None),
        "poison_delivered": poison_delivered,
        "unexpected_failures": len(unexpected_failures) + len(unexpected_submit_errors),
        "unexpected_examples": (unexpected_failures + unexpected_submit_errors)[:5],
        "wrong_values": wrong_values,
        "restarted": restarted[0] if restarted else None,
        "requeued_total": stats["requeued"],
        "queued_after": stats["queued"],
        "in_flight_after": stats["in_flight"],
        "waiting_for_inputs_after": stats["waiting_for_inputs"],
        "worker_reservations_after": sum(client.run(_worker_reservations).values()),
        "submit_seconds": submit_s,
        "seconds": elapsed,
        "requests_per_s": n / elapsed,
        "latency_p50_ms": stats["latency_p50"] * 1e3 if stats["latency_p50"] is not None else None,
        "latency_p99_ms": stats["latency_p99"] * 1e3 if stats["latency_p99"] is not None else None,
    }


def run_load_test(rounds: int = 5, per_round: int = 20_000, n_workers: int = 2, seed: int = 0,
                  benchmark_on_start: bool = False, verbose: bool = False) -> dict:
    """Start a LocalCluster of ``n_workers`` processes, run the rounds, return the record."""
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(seed)
    record: dict = {
        "config": {"rounds": rounds, "per_round": per_round, "n_workers": n_workers, "seed": seed,
                   "features": FEATURES, "malformed": 0.01, "poison": 0.002, "cancel": 0.01,
                   "benchmark_on_start": benchmark_on_start},
        "rounds": [],
        "worker_rss_mib": [],
        "worker_objects": [],
        "client_rss_mib": [],
    }
    import psutil

    # the start-up reference benchmark only informs placement; it is not what this test is about
    with dask.config.set({"dynbatch.benchmark.on-start": benchmark_on_start}):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                client.register_plugin(ddb.DynBatchPlugin())
                spec = ddb.ModelSpec("load-test", load=build_poison_affine, max_batch_size=256)
                batcher = ddb.Batcher(client, spec)
                for r in range(rounds):
                    result = run_round(client, batcher, per_round, rng, restart=(r == 0))
                    record["rounds"].append(result)
                    names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
                    record["worker_rss_mib"].append(
                        {names.get(a, a): rss / 2**20 for a, rss in client.run(_worker_rss).items()}
                    )
                    record["worker_objects"].append(
                        {names.get(a, a): n for a, n in client.run(_python_objects).items()}
                    )
                    record["client_rss_mib"].append(psutil.Process().memory_info().rss / 2**20)
                    if verbose:
                        print(f"round {r}: {result['requests_per_s']:.0f} req/s, delivered {result['delivered']}, "
                              f"failed {result['failed']}, cancelled {result['cancelled']}, "
                              f"unexpected {result['unexpected_failures']}, worker RSS {record['worker_rss_mib'][-1]}, "
                              f"objects {record['worker_objects'][-1]}",
                              flush=True)
                stats = batcher.stats()
                record["batcher_stats"] = {k: v for k, v in stats.items() if k != "workers"}
                record["samples_per_worker"] = {a: w["samples"] for a, w in stats["workers"].items()}
                batcher.close()
    record["worker_rss_growth_mib"] = _growth(record["worker_rss_mib"])
    record["worker_objects_growth"] = _growth(record["worker_objects"])
    record["client_rss_growth_mib"] = (max(record["client_rss_mib"][1:]) - record["client_rss_mib"][1]
                                       if rounds > 1 else 0.0)
    return record


def _growth(per_round: list[dict[str, float]]) -> float:
    """Largest rise of any worker's figure above its value after the second round (the first
    round warms up and holds the restart)."""
    if len(per_round) < 2:
        return 0.0
    base = per_round[1]
    return max((rss[name] - base[name] for rss in per_round[2:] for name in base if name in rss), default=0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="load_test")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    record = run_load_test(args.rounds, args.per_round, args.workers, args.seed, verbose=True)
    record["machine"] = machine_stamp()
    record["total_requests"] = args.rounds * args.per_round
    record["total_seconds"] = time.perf_counter() - started
    rounds = record["rounds"]
    record["ok"] = all(
        r["delivered"] + r["failed"] + r["cancelled"] == r["submitted"] and r["unexpected_failures"] == 0
        and r["poison_delivered"] == 0 and r["wrong_values"] == 0 and r["unresolved"] == 0
        and r["malformed_rejected"] == r["malformed"] and r["queued_after"] == 0 and r["in_flight_after"] == 0
        and r["worker_reservations_after"] == 0
        for r in rounds
    ) and rounds[0]["restarted"] is not None
    path = save(args.out, record)
    print(f"ok={record['ok']} worker RSS growth {record['worker_rss_growth_mib']:.1f} MiB, "
          f"worker objects growth {record['worker_objects_growth']:.0f}, "
          f"client RSS growth {record['client_rss_growth_mib']:.1f} MiB -> {path}")


if __name__ == "__main__":
    main()
