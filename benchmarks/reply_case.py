"""Large replies: per-token outputs of a text model coming back to a client on the same host
(``reply_case.json`` and ``.png``).

A stand-in for the GPU text case that needs no GPU: a padded model that sleeps 0.7 us per padded
token (about what a BERT-base-sized encoder takes on an H100 at these lengths) and returns
per-token features of width 768 in fp16 (1.5 KB a token, about 3 GB for the 20,000 requests) and
their pooled row. Requests of log-normal lengths (median 80, 4 to 512 tokens), one worker, every
contender in the same cluster, rounds interleaved:

``pooled``        the pooled row alone (1.5 KB a request): what the path carries without large replies
``tokens_comm``   per-token outputs, replies over the Dask comm (the default)
``tokens_shm``    per-token outputs, replies through shared memory (``shared-memory-replies: true``)

``ideal`` is the rate of the model's own sleep with no padding at all; ``cpu_s``: per pass, the
CPU seconds of the client process (client and scheduler) and of the worker process.

    python benchmarks/reply_case.py            # about 2 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

US_PER_TOKEN = 0.7
WIDTH = 768


def _build(per_token: bool):
    import torch

    class StandIn(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            rows, length = input_ids.shape
            time.sleep(rows * length * US_PER_TOKEN * 1e-6)
            pooled = torch.ones((rows, WIDTH), dtype=torch.float16)
            if not per_token:
                return {"pooler_output": pooled}
            return {"last_hidden_state": torch.ones((rows, length, WIDTH), dtype=torch.float16), "pooler_output": pooled}

    return StandIn()


def build_tokens(device: str = "cpu"):
    return _build(True)


def build_pooled(device: str = "cpu"):
    return _build(False)


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def make_samples(n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(80), 0.7, n)), 4, 512).astype(int)
    samples = [{"input_ids": rng.integers(1, 30_000, int(n_)), "attention_mask": np.ones(int(n_), dtype=np.int64)}
               for n_ in lengths]
    return samples, lengths


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["contenders"])
    means = [float(np.mean(result["contenders"][k])) for k in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, means, color=["#999999", "#d95f02", "#1b9e77"][: len(names)])
    for i, k in enumerate(names):
        ax.plot([i] * len(result["contenders"][k]), result["contenders"][k], "k.", ms=4)
    ax.axhline(result["ideal"], color="k", ls="--", lw=1, label="ideal (the model's sleep, no padding)")
    ax.set_ylabel("requests/s")
    m = result["machine"]
    ax.set_title(f"{result['requests']:,} text requests, {result['per_token_gb']:.1f} GB of per-token outputs a pass\n"
                 f"{m.get('cpu')}, {m['cpu_count']} cores, {m['date']}, commit {m.get('commit')}", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import dask
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    samples, lengths = make_samples(args.requests)
    n = len(samples)
    result: dict = {"machine": machine_stamp(), "requests": n, "tokens": int(lengths.sum()),
                    "per_token_gb": float(lengths.sum()) * WIDTH * 2 / 1e9,
                    "ideal": n / (float(lengths.sum()) * US_PER_TOKEN * 1e-6), "contenders": {}, "cpu_s": {},
                    "worker": {}}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        batchers = {}
        for name, load, replies in (("pooled", build_pooled, True), ("tokens_comm", build_tokens, False),
                                    ("tokens_shm", build_tokens, True)):
            with dask.config.set({"dynbatch.transport.shared-memory-replies": replies}):
                batchers[name] = ddb.Batcher(client, ddb.ModelSpec(f"reply-{name}", load=load, pad_value=0))
            [f.result() for f in batchers[name].map(samples)]  # load, and let the controller grow
        (worker_pid,) = client.run(os.getpid).values()
        for r in range(args.rounds):
            for name, batcher in batchers.items():
                cpu = (cpu_seconds(os.getpid()), cpu_seconds(worker_pid))
                started = time.perf_counter()
                out = [f.result() for f in batcher.map(samples)]
                rate = n / (time.perf_counter() - started)
                del out
                used = (cpu_seconds(os.getpid()) - cpu[0], cpu_seconds(worker_pid) - cpu[1])
                result["contenders"].setdefault(name, []).append(rate)
                result["cpu_s"].setdefault(name, []).append({"client": used[0], "worker": used[1]})
                print(r, name, round(rate), "CPU s client/worker", round(used[0], 2), round(used[1], 2), flush=True)
        for name, batcher in batchers.items():
            (worker,) = batcher.stats()["workers"].values()
            result["worker"][name] = {"replies": worker["replies"], "padding_waste": worker["padding_waste"]}
            batcher.close()
        result["reply_files"] = next(iter(client.run(
            lambda dask_worker: dask_worker.extensions["dynbatch"].replies.summary()).values()))
    means = {k: float(np.mean(v)) for k, v in result["contenders"].items()}
    result["ratios"] = {"tokens_shm_vs_comm": means["tokens_shm"] / means["tokens_comm"],
                        "tokens_shm_vs_pooled": means["tokens_shm"] / means["pooled"],
                        "tokens_comm_vs_pooled": means["tokens_comm"] / means["pooled"]}
    print({k: round(v, 3) for k, v in result["ratios"].items()}, flush=True)
    out = Path(args.out)
    save("reply_case", result, out)
    plot(result, out / "reply_case.png")


if __name__ == "__main__":
    main()
