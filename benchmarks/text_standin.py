"""The GPU text case's traffic on a CPU: what replies in parts change, without a GPU.

A padded "model" that sleeps 0.6 us per padded token plus 0.5 ms per batch (the sleep releases the
GIL, as a GPU kernel leaves the host free) and returns per-token outputs of width ``--width``
(fp16) and a pooled one; 20,000 requests of the GPU case's log-normal lengths (median 80, at most
512). One LocalCluster worker (1 process x 1 thread). Contenders, in rounds that rotate their order:

``sorted``   a task on the worker: the requests sorted by length, cut into batches of at most
             65,536 padded tokens, each padded to its longest row and run (the hand-written loop)
``parts``    ``Batcher.map`` with ``pad_value=0`` and every result, default settings (replies in parts)
``whole``    the same with ``dynbatch.transport.replies-in-parts`` off: a shipment answered once its
             last row ran

Each dask-dynbatch contender has its own Batcher (one untimed pass first). Per timed pass: the
model's busy share of the pass, the gaps between its batches and the padding (also split by when
its batches started: the pass's first fifth, its last tenth, between), from the batches' own
start and end times in the worker.

    python benchmarks/text_standin.py          # writes benchmarks/results/text_standin.{json,png}
    python benchmarks/text_standin.py --requests 3000 --rounds 1 --out /tmp/standin   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save, throughput_bars  # noqa: E402
from gpu_text_case import make_requests  # noqa: E402  (the GPU case's lengths)

import dask_dynbatch as ddb  # noqa: E402

SECONDS_PER_TOKEN = 0.6e-6
SECONDS_PER_BATCH = 0.5e-3
BUDGET = 65_536

_LOG: list[tuple[float, float, int, int, int]] = []  # (start, end, rows, length, real tokens), in the worker


def build_sleeper(width: int, device: str = "cpu"):
    def model(input_ids, attention_mask):
        start = time.perf_counter()
        time.sleep(SECONDS_PER_TOKEN * input_ids.shape[0] * input_ids.shape[1] + SECONDS_PER_BATCH)
        _LOG.append((start, time.perf_counter(), int(input_ids.shape[0]), int(input_ids.shape[1]),
                     int(attention_mask.sum())))
        return {"last_hidden_state": np.zeros((*input_ids.shape, width), np.float16),
                "pooler_output": np.zeros((input_ids.shape[0], width), np.float16)}

    return model


def take_log(clear: bool = False) -> list:
    out = list(_LOG)
    if clear:
        _LOG.clear()
    return out


def sorted_loop(requests: list[np.ndarray], width: int) -> float:
    """In the worker: the hand-written loop over the requests sorted by length; its seconds."""
    model = build_sleeper(width)
    started = time.perf_counter()
    order = sorted(range(len(requests)), key=lambda i: len(requests[i]))
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(requests[order[j]]) <= BUDGET:
            j += 1
        rows = [requests[k] for k in order[i:j]]
        length = len(rows[-1])
        ids = np.zeros((len(rows), length), np.int64)
        mask = np.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        out = model(ids, mask)
        _ = [out["last_hidden_state"][r, : len(row)] for r, row in enumerate(rows)]
        i = j
    return time.perf_counter() - started


def timeline(log: list, seconds: float) -> dict:
    """The model's busy share, gaps and padding over one pass, from its batches' own times."""
    if not log:
        return {}
    busy = sum(end - start for start, end, *_ in log)
    gaps = [log[i][0] - log[i - 1][1] for i in range(1, len(log))]
    padded = sum(rows * length for _, _, rows, length, _ in log)
    real = sum(entry[4] for entry in log)
    # where the padding is: batches that started in the pass's first fifth (formed while its
    # shipments still arrive), in its last tenth (the rows left over) and between
    span, first = log[-1][1] - log[0][0], log[0][0]
    waste = {"first_fifth": 0, "middle": 0, "last_tenth": 0}
    for start, _, rows, length, used in log:
        at = (start - first) / span if span > 0 else 0.0
        waste["first_fifth" if at < 0.2 else "last_tenth" if at >= 0.9 else "middle"] += rows * length - used
    return {"pass_s": seconds, "span_s": span, "busy_s": busy, "busy_share": busy / seconds,
            "batches": len(log), "gap_s_over_5ms": sum(g for g in gaps if g > 0.005),
            "largest_gap_s": max(gaps, default=0.0), "padding": padded / real - 1,
            "padding_by_part": {k: v / real for k, v in waste.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import dask
    import text_standin as standin  # (by module: the workers import it, and its log is theirs)
    from distributed import Client, LocalCluster

    requests = make_requests(args.requests, 80)
    samples = [{"input_ids": r, "attention_mask": np.ones_like(r)} for r in requests]
    n = len(samples)
    result: dict = {"machine": machine_stamp(), "requests": n, "width": args.width,
                    "model": {"seconds_per_token": SECONDS_PER_TOKEN, "seconds_per_batch": SECONDS_PER_BATCH},
                    "sorted_budget": BUDGET, "tokens": int(sum(len(r) for r in requests))}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        batchers = {}
        for name, parts in (("parts", True), ("whole", False)):
            with dask.config.set({"dynbatch.transport.replies-in-parts": parts}):
                load = functools.partial(standin.build_sleeper, args.width)
                batchers[name] = ddb.Batcher(client, ddb.ModelSpec(f"standin-{name}", load=load, pad_value=0))
            [f.result() for f in batchers[name].map(samples)]  # untimed: load, the controller climbs
        remote = client.scatter(requests, broadcast=True)
        seconds: dict[str, list[float]] = {"sorted": [], "parts": [], "whole": []}
        lines: dict[str, list[dict]] = {"parts": [], "whole": []}
        for r in range(args.rounds):
            names = list(seconds)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                if name == "sorted":
                    seconds[name].append(client.submit(standin.sorted_loop, remote, args.width, pure=False).result())
                else:
                    client.run(standin.take_log, True)
                    started = time.perf_counter()
                    [f.result() for f in batchers[name].map(samples)]
                    seconds[name].append(time.perf_counter() - started)
                    (log,) = client.run(standin.take_log, True).values()
                    lines[name].append(timeline(log, seconds[name][-1]))
                print(name, f"{n / seconds[name][-1]:,.0f} requests/s", flush=True)
        stats = {name: {k: b.stats().get(k) for k in ("delivered", "answered_early", "requeued", "failed")}
                 for name, b in batchers.items()}
        for b in batchers.values():
            b.close()
    throughput = {k: n / statistics.median(v) for k, v in seconds.items()}
    result |= {"throughput": throughput, "seconds": seconds, "timelines": lines, "stats": stats,
               "ratio_to_sorted": {k: throughput[k] / throughput["sorted"] for k in ("parts", "whole")},
               "parts_over_whole": throughput["parts"] / throughput["whole"]}
    path = save("text_standin", result, args.out)
    print(path, json.dumps({k: result[k] for k in ("ratio_to_sorted", "parts_over_whole")}))
    m = result["machine"]
    throughput_bars(Path(args.out) / "text_standin.png", throughput, ["tab:gray", "tab:blue", "tab:orange"], "requests/s",
                    f"GPU text traffic on a CPU stand-in ({m.get('cpu_count', '?')} cores, {m.get('commit')}): "
                    f"parts / whole {result['parts_over_whole']:.2f}")


if __name__ == "__main__":
    main()
