"""Variable-length text on the CPU: a tiny BERT, requests of log-normal lengths in [5, 300] tokens
(targets: dask-dynbatch with default settings >= 0.9x a hand-written loop that sorts by length and
pads per batch, and >= 1.5x padding every request to the maximum).

One LocalCluster (1 worker process x 1 thread). Every contender runs the same model in that worker
process and returns every request's own outputs (``last_hidden_state`` cut to its length, and
``pooler_output``) to this client:

``dynbatch``   ``Batcher(ModelSpec(..., pad_value=0)).map`` of the dict samples, then every result
               (after untimed passes, so the controller has settled).
``sorted``     a task on the worker: sort the requests by length, cut batches of B, pad each to its
               longest row, run, cut each output back; the best B of 8, 16, 32, 64.
``padmax``     a task on the worker: batches of B in arrival order, every row padded to the maximum
               length (300); the best B of 8, 16, 32.

``compiled`` (with ``--compile``) the same with ``compile=True``: each batch padded to its (rows, length)
               bucket and run by that bucket's compiled graph once it is ready (untimed passes first,
               until no bucket is left to compile or ``--compile-warm`` seconds have passed).

Rounds rotate the order of the contenders; each contender's throughput is its median over the rounds.

    python benchmarks/text_case.py               # writes benchmarks/results/text_case.{json,png}
    python benchmarks/text_case.py --compile     # adds "compiled": text_case_compiled.{json,png}
    python benchmarks/text_case.py --requests 300 --rounds 1 --out /tmp/text   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save, throughput_bars  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

MAX_LENGTH = 300
VOCAB = 1000


def build_tiny_bert(device="cpu"):
    """BERT with 2 layers, hidden size 128 (random weights, fp32); without transformers, a
    torch encoder of the same size behind the same call."""
    import torch

    torch.manual_seed(0)
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return _TorchEncoder().to(device).eval()
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=512)
    return BertModel(config).to(device).eval()


def _TorchEncoder():
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 128)
            layer = torch.nn.TransformerEncoderLayer(128, 2, 512, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2)

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
            return {"last_hidden_state": hidden, "pooler_output": hidden[:, 0]}

    return Encoder()


_MODEL: dict = {}


def _model():
    if "m" not in _MODEL:
        _MODEL["m"] = build_tiny_bert()
    return _MODEL["m"]


def _run_padded(model, rows: list[np.ndarray], length: int) -> list[dict]:
    import torch

    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    hidden, pooled = out["last_hidden_state"].numpy(), out["pooler_output"].numpy()
    return [{"last_hidden_state": hidden[i, : len(r)].copy(), "pooler_output": pooled[i].copy()} for i, r in enumerate(rows)]


def sorted_loop(requests: list[np.ndarray], batch: int) -> tuple[list[dict], float]:
    """By hand: sort by length, pad per batch; outputs in request order, and the padding waste."""
    model = _model()
    order = sorted(range(len(requests)), key=lambda i: len(requests[i]))
    out: list = [None] * len(requests)
    padded = real = 0
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        rows = [requests[i] for i in idx]
        length = max(len(r) for r in rows)
        padded += length * len(rows)
        real += sum(len(r) for r in rows)
        for i, o in zip(idx, _run_padded(model, rows, length)):
            out[i] = o
    return out, padded / real - 1


def padmax_loop(requests: list[np.ndarray], batch: int) -> tuple[list[dict], float]:
    """By hand: batches in arrival order, every row padded to the maximum length."""
    model = _model()
    out: list = []
    for start in range(0, len(requests), batch):
        out.extend(_run_padded(model, requests[start : start + batch], MAX_LENGTH))
    real = sum(len(r) for r in requests)
    return out, MAX_LENGTH * len(requests) / real - 1


def make_requests(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(50), 0.8, n)), 5, MAX_LENGTH).astype(int)
    return [rng.integers(1, VOCAB, int(length)) for length in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--compile", action="store_true", help="add dynbatch with compile=True")
    parser.add_argument("--compile-warm", type=float, default=600.0,
                        help="seconds of untimed passes at most, for the compiled buckets")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    requests = make_requests(args.requests)
    samples = [{"input_ids": r, "attention_mask": np.ones_like(r)} for r in requests]
    result: dict = {"machine": machine_stamp(), "requests": args.requests,
                    "lengths": {"min": int(min(map(len, requests))), "median": float(np.median([len(r) for r in requests])),
                                "max": int(max(map(len, requests))), "tokens": int(sum(map(len, requests)))}}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        client.run(_model)  # the loops' model, loaded before they are timed
        spec = ddb.ModelSpec("tiny-bert-text", load=build_tiny_bert, pad_value=0)
        with ddb.Batcher(client, spec) as batcher:
            for _ in range(2):  # untimed: load, the controller climbs
                [f.result() for f in batcher.map(samples)]

            def dynbatch():
                started = time.perf_counter()
                outs = [f.result() for f in batcher.map(samples)]
                return time.perf_counter() - started, outs

            def by_hand(loop, b):
                def run():
                    started = time.perf_counter()
                    outs, waste = client.submit(loop, requests, b, pure=False).result()
                    return time.perf_counter() - started, outs, waste
                return run

            contenders = {"dynbatch": dynbatch}
            compiled = None
            if args.compile:
                compiled = ddb.Batcher(client, ddb.ModelSpec("tiny-bert-text-compiled", load=build_tiny_bert,
                                                             pad_value=0, compile=True))
                result["compile_warm"] = warm_compiled(compiled, samples, args.compile_warm)

                def run_compiled():
                    started = time.perf_counter()
                    outs = [f.result() for f in compiled.map(samples)]
                    return time.perf_counter() - started, outs

                contenders["compiled"] = run_compiled
            contenders |= {f"sorted_{b}": by_hand(sorted_loop, b) for b in (8, 16, 32, 64)}
            contenders |= {f"padmax_{b}": by_hand(padmax_loop, b) for b in (8, 16, 32)}
            seconds: dict[str, list[float]] = {k: [] for k in contenders}
            waste: dict[str, float] = {}
            check = None
            for r in range(args.rounds):
                names = list(contenders)
                names = names[r % len(names):] + names[: r % len(names)]
                for name in names:
                    got = contenders[name]()
                    seconds[name].append(got[0])
                    if len(got) == 3:
                        waste[name] = got[2]
                    if name == "dynbatch":
                        check = got[1]
                    elif (name.startswith("sorted") or name == "compiled") and check is not None:  # same answers
                        np.testing.assert_allclose(check[0]["pooler_output"], got[1][0]["pooler_output"], atol=1e-3)
                    print(name, f"{args.requests / got[0]:.0f} req/s", flush=True)
            stats = batcher.stats()
            worker = next(iter(stats["workers"].values()))
            history = batcher.history()
            if compiled is not None:
                compiled_worker = next(iter(compiled.stats()["workers"].values()))
                result["compiled"] = {"compile": compiled_worker["compile"],
                                      "padding_waste": compiled_worker["padding_waste"],
                                      "mean_device_batch": statistics.mean(h["device_batch"] for h in compiled.history()[-200:])}
                compiled.close()
    throughput = {k: args.requests / statistics.median(v) for k, v in seconds.items()}
    best_sorted = max((k for k in throughput if k.startswith("sorted")), key=throughput.get)
    best_padmax = max((k for k in throughput if k.startswith("padmax")), key=throughput.get)
    result |= {
        "throughput": throughput,
        "seconds": seconds,
        "best_sorted": best_sorted,
        "best_padmax": best_padmax,
        "ratio_to_sorted": throughput["dynbatch"] / throughput[best_sorted],
        "ratio_to_padmax": throughput["dynbatch"] / throughput[best_padmax],
        "padding_waste": {"dynbatch": worker["padding_waste"], **waste},
        "dynbatch_mean_device_batch": statistics.mean(h["device_batch"] for h in history[-200:]),
        "dynbatch_controller": worker["controller"],
        "targets": {"ratio_to_sorted": 0.9, "ratio_to_padmax": 1.5},
    }
    if "compiled" in throughput:
        result["compiled_ratio_to_sorted"] = throughput["compiled"] / throughput[best_sorted]
        result["compiled_ratio_to_dynbatch"] = throughput["compiled"] / throughput["dynbatch"]
    name = "text_case_compiled" if args.compile else "text_case"
    path = save(name, result, args.out)
    print(path, {k: round(v, 3) for k, v in result.items() if "ratio" in k}, result["padding_waste"])
    plot(result, Path(args.out) / f"{name}.png")


def warm_compiled(batcher, samples: list, limit: float) -> dict:
    """Untimed passes of the compiled Batcher until no bucket is queued or compiling after a pass
    that ran compiled batches (or ``limit`` seconds): what it took, and the compile state then."""
    started = time.perf_counter()
    passes = 0
    state: dict = {}
    while time.perf_counter() - started < limit:
        [f.result() for f in batcher.map(samples)]
        passes += 1
        state = next(iter(batcher.stats()["workers"].values()))["compile"] or {}
        busy = [b for b, info in state.get("buckets", {}).items() if info["state"] in ("queued", "compiling")]
        print(f"compile warm-up pass {passes}: ready {state.get('ready')}, busy {busy}", flush=True)
        if state.get("error") or (state.get("compiled_batches") and not busy and passes >= 3):
            break
    return {"seconds": time.perf_counter() - started, "passes": passes, "state": state}


def plot(result: dict, path: Path) -> None:
    names = list(result["throughput"])
    colors = ["tab:blue" if n in ("dynbatch", "compiled") else "tab:green" if n.startswith("sorted") else "tab:gray" for n in names]
    m = result["machine"]
    throughput_bars(path, result["throughput"], colors, "requests/s",
                    f"tiny BERT, {result['requests']} requests of {result['lengths']['min']}-{result['lengths']['max']} "
                    f"tokens ({m.get('cpu_count', '?')} cores)\n dynbatch / best sorted {result['ratio_to_sorted']:.2f}, "
                    f"/ best pad-to-max {result['ratio_to_padmax']:.2f}")


if __name__ == "__main__":
    main()
