"""Variable-length text on one GPU (targets: dask-dynbatch with ``pad_value=0`` and default settings
>= 90 % of the best hand-written sorted-bucket loop with its input already on the GPU; padding waste
<= 15 %; under the memory-pressure neighbour of ``gpu_case.py``, 0 failed requests while fixed
pad-to-max batches fail).

A BERT-base-sized encoder (12 layers, width 768, 12 heads, fp16; ``torch.nn.TransformerEncoder``,
random weights) called as ``model(input_ids=..., attention_mask=...)``; 20,000 requests with
log-normal lengths (median ~80, at most 512). One LocalCluster worker process with the GPU.

``dynbatch``     ``Batcher.map`` of the dict samples and every result, after two untimed passes
``dynbatch_pooled``  the same with the pooled output alone (what a sentence-embedding service
                 returns): the per-token outputs of ``dynbatch`` travel to the client, about
                 150 KB a request, which the in-worker loop below never moves
``dynbatch_shm_replies``  (``--shm-replies``) ``dynbatch`` again with its replies through shared
                 memory (``dynbatch.transport.shared-memory-replies``)
``dynbatch_whole_replies``  (``--whole-replies``) ``dynbatch`` again with each shipment answered once
                 its last row ran (``dynbatch.transport.replies-in-parts`` off)
``sorted_<t>``   in the worker: every request's ids already on the GPU, sorted by length, cut into
                 batches of at most ``t`` tokens (rows times their longest), padded, run; the best
                 of several ``t``
``pressure``     a neighbour process holds all but ``--hog-keep-gib`` of the GPU's memory: dask-dynbatch
                 serves 20,000 requests; then fixed pad-to-max batches (``--padmax-batch``: rows of 512
                 tokens, several sizes) run on plain Dask with the neighbour holding the same memory,
                 failures counted per size

    python benchmarks/gpu_text_case.py --out $OUT                  # on the GPU machine
    python benchmarks/gpu_text_case.py --smoke --out /tmp/gtext    # on a CPU: tiny sizes, the code paths only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import dask
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save, server_state  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

MAX_LENGTH = 512
VOCAB = 30_000
SIZES = {"full": dict(width=768, layers=12, heads=12, ffn=3072), "smoke": dict(width=32, layers=1, heads=2, ffn=64)}
_MODEL: dict = {}


def build_encoder(device: str = "cpu", size: str = "full", per_token: bool = True):
    """The encoder: fp16 on CUDA, fp32 on a CPU; outputs per-token features and their mean (or,
    ``per_token=False``, the mean alone: a sentence-embedding service)."""
    import torch
    from torch import nn

    dims = SIZES[size]

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, dims["width"])
            self.position = nn.Embedding(MAX_LENGTH, dims["width"])
            layer = nn.TransformerEncoderLayer(dims["width"], dims["heads"], dims["ffn"], batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, dims["layers"], enable_nested_tensor=False)

        def forward(self, input_ids, attention_mask):
            mark = _timeline_start(input_ids)
            out = self._forward(input_ids, attention_mask)
            _timeline_end(mark, input_ids, attention_mask)
            return out

        def _forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.embed(input_ids) + self.position(positions)[None]
            hidden = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            mask = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            return {"last_hidden_state": hidden, "pooler_output": pooled} if per_token else {"pooler_output": pooled}

    torch.manual_seed(0)
    model = Encoder().eval().to(device)
    return model.half() if str(device).startswith("cuda") else model


# --timeline: every forward's start and end as CUDA events (GPU time, not the launching thread's),
# kept in the worker process and summed up by ``timeline_summary``


def _timeline() -> dict:
    """The worker process's one record (functions of a script travel by value, each with its own
    copies of the script's globals: the record lives in ``sys.modules``)."""
    module = sys.modules.get("_gpu_text_timeline")
    if module is None:
        import types

        module = sys.modules["_gpu_text_timeline"] = types.ModuleType("_gpu_text_timeline")
        module.state = {"on": False, "marks": []}
    return module.state


def timeline_switch(on: bool) -> None:
    _timeline().update(on=on, marks=[])


def _timeline_start(ids):
    if not _timeline()["on"] or not ids.is_cuda:
        return None
    import torch

    start = torch.cuda.Event(enable_timing=True)
    start.record()
    return start, time.perf_counter()


def _timeline_end(mark, ids, mask) -> None:
    if mark is None:
        return
    import torch

    end = torch.cuda.Event(enable_timing=True)
    end.record()
    _timeline()["marks"].append((mark[0], end, mark[1], time.perf_counter(), int(ids.shape[0]), int(ids.shape[1]), mask))


def timeline_summary() -> dict:
    """The GPU's busy share over the recorded forwards (first start to last end), the idle gaps
    between consecutive forwards, and the batches' tokens (padded) and rows."""
    import torch

    marks = list(_timeline()["marks"])
    if not marks:
        return {}
    torch.cuda.synchronize()
    busy = [a.elapsed_time(b) / 1e3 for a, b, *_ in marks]
    gaps = [max(0.0, marks[i][1].elapsed_time(marks[i + 1][0]) / 1e3) for i in range(len(marks) - 1)]
    span = marks[0][0].elapsed_time(marks[-1][1]) / 1e3
    tokens = [m[4] * m[5] for m in marks]
    real = [int(m[6].sum()) for m in marks]
    launch = [m[3] - m[2] for m in marks]  # the launching thread's time in forward
    cuts = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.05]
    return {"batches": len(marks), "span_s": span, "busy_s": sum(busy), "busy_share": sum(busy) / span if span else None,
            "gap_s": sum(gaps), "gaps_over": {str(c): sum(1 for g in gaps if g > c) for c in cuts},
            "gap_s_over_5ms": sum(g for g in gaps if g > 0.005),
            "mean_tokens": statistics.mean(tokens), "median_tokens": statistics.median(tokens),
            "mean_rows": statistics.mean(m[4] for m in marks), "padding": sum(tokens) / max(1, sum(real)) - 1,
            "mean_launch_s": statistics.mean(launch), "mean_gpu_s": statistics.mean(busy),
            "batches_detail": [(round(b, 5), t, m[4], round(g, 5)) for b, t, m, g in zip(busy, tokens, marks, gaps + [0.0])][-200:]}


def build_full(device: str = "cpu"):
    return build_encoder(device, "full")


def build_smoke(device: str = "cpu"):
    return build_encoder(device, "smoke")


def build_full_pooled(device: str = "cpu"):
    return build_encoder(device, "full", per_token=False)


def build_smoke_pooled(device: str = "cpu"):
    return build_encoder(device, "smoke", per_token=False)


def run_alone(samples: list, size: str, per_token: bool) -> list[dict]:
    """In the worker: each sample through the encoder alone (a batch of one, nothing padded)."""
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = build_encoder(device, size, per_token)
    outs = []
    with torch.inference_mode():
        for sample in samples:
            ids = torch.from_numpy(sample["input_ids"])[None].to(device)
            mask = torch.from_numpy(sample["attention_mask"])[None].to(device)
            outs.append({k: v[0].float().cpu().numpy() for k, v in model(input_ids=ids, attention_mask=mask).items()})
    return outs


def verify(client, batcher, samples: list, n: int, size: str, per_token: bool) -> dict:
    """The served outputs of the first ``n`` samples against each run alone: the largest
    difference, and how many requests differ by more than 0.1 anywhere (fp16 batches differ from
    a batch of one by far less; a row that read another's input differs by far more)."""
    served = [f.result() for f in batcher.map(samples[:n])]
    alone = client.submit(run_alone, samples[:n], size, per_token, pure=False).result()
    worst, bad = 0.0, 0
    for got, want in zip(served, alone):
        diff = max(float(np.max(np.abs(np.asarray(got[k], dtype=np.float32) - want[k]))) for k in want)
        worst = max(worst, diff)
        bad += diff > 0.1
    print("verify", n, "max diff", round(worst, 4), "over 0.1:", bad, flush=True)
    return {"requests": n, "max_abs_diff": worst, "over_0.1": bad}


def dynbatch_passes(client, name: str, load, samples: list, passes: int = 3, timeline: bool = False,
                    profile: Path | None = None, check: int = 0, size: str = "full", per_token: bool = True,
                    shm_replies: bool = False, parts: bool = True) -> dict:
    """``Batcher.map`` of every sample and all its results, ``passes`` times (the last one timed);
    ``timeline``: the GPU's busy share in the timed pass; ``profile``: then py-spy (when installed)
    of the worker over two more passes, as ``<profile>_gil.raw`` (threads holding the GIL) and
    ``<profile>_threads.raw`` (every thread, idle ones too)."""
    n = len(samples)
    extra: dict = {}
    with dask.config.set({"dynbatch.transport.shared-memory-replies": shm_replies,
                          "dynbatch.transport.replies-in-parts": parts}):
        batcher = ddb.Batcher(client, ddb.ModelSpec(name, load=load, pad_value=0))
    with batcher:
        rates = []
        for i in range(passes):
            if timeline and i == passes - 1:
                client.run(timeline_switch, True)
            started = time.perf_counter()
            [f.result() for f in batcher.map(samples)]
            rates.append(n / (time.perf_counter() - started))
            print(name, "pass", round(rates[-1]), flush=True)
        if timeline:
            extra["timeline"] = next(iter(client.run(timeline_summary).values()))
            extra["timeline"]["pass_s"] = n / rates[-1]
            client.run(timeline_switch, False)
            print(name, "timeline", {k: v for k, v in extra["timeline"].items() if k != "batches_detail"}, flush=True)
        if profile is not None:
            extra["profile_rates"] = profile_passes(client, batcher, samples, profile)
        if check:
            extra["verify"] = verify(client, batcher, samples, check, size, per_token)
        stats = batcher.stats()
        worker = next(iter(stats["workers"].values()))
        # results that came back in a part of their shipment's reply, before the rest of it ran
        extra["answered_early"] = stats.get("answered_early", 0) / max(1, stats["delivered"])
        history = batcher.history()
        # the server's own controller: its throughput per size (real tokens a second) and best size
        (server,) = server_state(client, name).values()
        control = server["controller"]
        extra["server_controller"] = {k: control.get(k) for k in ("size", "best_size", "best_throughput", "throughput",
                                                                   "throughput_noise", "phase", "reason")}
    columns = ("size", "device_batch", "controller_size", "latency", "compute_s", "round_trip_s", "worker_s", "stack_s")
    return {"throughput": rates[-1], "untimed": rates[:-1], "padding_waste": worker["padding_waste"],
            "controller": worker["controller"],
            "mean_device_batch": statistics.mean(h["device_batch"] for h in history[-300:]),
            "history_columns": columns, "history": [tuple(h[k] for k in columns) for h in history[-400:]],
            "decisions": [h["reason"] for h in history[-400:] if h["decision"] != "hold"][-60:], **extra}


def profile_passes(client, batcher, samples: list, stem: Path) -> list[float]:
    """Two passes under py-spy (GIL holders), two under py-spy (every thread); their rates."""
    import os
    import shutil
    import subprocess

    spy = shutil.which("py-spy")
    if spy is None:
        return []
    pid = next(iter(client.run(os.getpid).values()))
    rates = []
    for kind, flags in (("gil", ["--gil"]), ("threads", ["--idle"])):
        proc = subprocess.Popen([spy, "record", "--pid", str(pid), "-r", "200", "-f", "raw", "--threads", "--nonblocking",
                                 *flags, "-o", f"{stem}_{kind}.raw"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        for _ in range(2):
            started = time.perf_counter()
            [f.result() for f in batcher.map(samples)]
            rates.append(len(samples) / (time.perf_counter() - started))
        proc.send_signal(2)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("profiled passes", [round(r) for r in rates], flush=True)
    return rates


def make_requests(n: int, median: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(median), 0.7, n)), 4, MAX_LENGTH).astype(int)
    return [rng.integers(1, VOCAB, int(length)) for length in lengths]


def sorted_loop(requests: list[np.ndarray], token_budgets: list[int], size: str, seconds: float) -> dict:
    """In the worker: the hand-written best case. Ids on the device first, then for each token
    budget, batches of sorted lengths run for about ``seconds``; requests/s per budget, and the
    padding waste."""
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = _MODEL.get(size) or _MODEL.setdefault(size, build_encoder(device, size))
    order = sorted(range(len(requests)), key=lambda i: len(requests[i]))
    on_device = [torch.from_numpy(requests[i]).to(device) for i in order]
    out = {}
    for budget in token_budgets:
        batches = []
        start = 0
        while start < len(on_device):
            stop = start + 1
            while stop < len(on_device) and (stop + 1 - start) * len(on_device[stop]) <= budget:
                stop += 1
            batches.append((start, stop))
            start = stop
        padded = sum((b - a) * len(on_device[b - 1]) for a, b in batches)
        real = sum(len(r) for r in on_device)
        prepared = []
        for a, b in batches:
            rows = on_device[a:b]
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            prepared.append((ids, (ids != 0).to(torch.int64)))
        done = 0
        started = time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - started < seconds or not done:
                for ids, mask in prepared:
                    model(input_ids=ids, attention_mask=mask)
                done += len(on_device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
        out[budget] = {"throughput": done / (time.perf_counter() - started), "padding_waste": padded / real - 1,
                       "batches": len(batches)}
    return out


def padmax_fixed(requests: list[np.ndarray], rows: int, size: str) -> dict:
    """In the worker: fixed batches of ``rows`` requests each padded to the maximum length; counts
    the requests whose batch failed (out of memory)."""
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = _MODEL.get(size) or _MODEL.setdefault(size, build_encoder(device, size))
    failed = 0
    errors = set()
    for start in range(0, len(requests), rows):
        part = requests[start : start + rows]
        ids = np.zeros((len(part), MAX_LENGTH), dtype=np.int64)
        for i, r in enumerate(part):
            ids[i, : len(r)] = r
        try:
            with torch.inference_mode():
                x = torch.from_numpy(ids).to(device)
                model(input_ids=x, attention_mask=(x != 0).to(torch.int64))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
        except Exception as exc:  # out of memory, counted
            failed += len(part)
            errors.add(type(exc).__name__)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"failed": failed, "requests": len(requests), "errors": sorted(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--median", type=int, default=80)
    parser.add_argument("--budgets", default="4096,8192,16384,32768,65536")
    parser.add_argument("--hog-keep-gib", type=float, default=6.0)
    parser.add_argument("--padmax-batch", default="128,256,512", help="rows of the fixed pad-to-max batches, each size counted")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, for a CPU")
    parser.add_argument("--skip-pressure", action="store_true")
    parser.add_argument("--verify", type=int, default=0, help="then compare this many requests' outputs with each run alone")
    parser.add_argument("--timeline", action="store_true", help="the GPU's busy share and gaps in each timed pass (CUDA events)")
    parser.add_argument("--profile", action="store_true", help="py-spy of the worker over extra passes of the pooled variant")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="then the pooled variant again with the worker's sys.setswitchinterval at this many seconds")
    parser.add_argument("--shm-replies", action="store_true",
                        help="then the per-token variant again with its replies through shared memory")
    parser.add_argument("--whole-replies", action="store_true",
                        help="then the per-token variant again with dynbatch.transport.replies-in-parts off")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    size = "smoke" if args.smoke else "full"
    n = 600 if args.smoke else args.requests
    budgets = [int(b) for b in args.budgets.split(",")]
    requests = make_requests(n, args.median)
    samples = [{"input_ids": r, "attention_mask": np.ones_like(r)} for r in requests]
    result: dict = {"machine": machine_stamp(), "requests": n, "model": size,
                    "lengths": {"median": float(np.median([len(r) for r in requests])),
                                "max": int(max(len(r) for r in requests)), "tokens": int(sum(len(r) for r in requests))}}
    load = build_smoke if args.smoke else build_full
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        table = client.submit(sorted_loop, requests, budgets, size, 1.0 if args.smoke else 5.0, pure=False).result()
        result["sorted"] = {str(k): v for k, v in table.items()}
        print("sorted", {k: round(v["throughput"]) for k, v in table.items()}, flush=True)
        # per-token outputs travel back to the client (about 150 KB a request at width 768 in
        # fp16), which the in-worker loop never does; the pooled variant returns 1.5 KB
        if args.timeline:
            client.run(timeline_switch, True)
            table = client.submit(sorted_loop, requests, budgets[-1:], size, 1.0, pure=False).result()
            result["sorted_timeline"] = next(iter(client.run(timeline_summary).values()))
            client.run(timeline_switch, False)
        result["dynbatch"] = dynbatch_passes(client, "text-encoder", load, samples, timeline=args.timeline,
                                             check=args.verify, size=size)
        save("gpu_text_case" if not args.smoke else "gpu_text_case_smoke", result, out)
        if args.shm_replies:
            result["dynbatch_shm_replies"] = dynbatch_passes(client, "text-encoder-shm-replies", load, samples,
                                                             timeline=args.timeline, check=args.verify, size=size,
                                                             shm_replies=True)
            save("gpu_text_case" if not args.smoke else "gpu_text_case_smoke", result, out)
        if args.whole_replies:
            result["dynbatch_whole_replies"] = dynbatch_passes(client, "text-encoder-whole-replies", load, samples,
                                                               timeline=args.timeline, size=size, parts=False)
            save("gpu_text_case" if not args.smoke else "gpu_text_case_smoke", result, out)
        pooled = build_smoke_pooled if args.smoke else build_full_pooled
        result["dynbatch_pooled"] = dynbatch_passes(client, "text-encoder-pooled", pooled, samples, timeline=args.timeline,
                                                    profile=out / "gpu_text_worker" if args.profile else None,
                                                    check=args.verify, size=size, per_token=False)
        if args.switch_interval is not None:
            before = next(iter(client.run(sys.getswitchinterval).values()))
            client.run(sys.setswitchinterval, args.switch_interval)
            result["dynbatch_pooled_switch"] = {"switch_interval": args.switch_interval, **dynbatch_passes(
                client, "text-encoder-pooled-switch", pooled, samples, timeline=args.timeline)}
            client.run(sys.setswitchinterval, before)
    best = max(result["sorted"], key=lambda k: result["sorted"][k]["throughput"])
    result["best_sorted_budget"] = int(best)
    result["ratio_to_sorted"] = result["dynbatch"]["throughput"] / result["sorted"][best]["throughput"]
    result["pooled_ratio_to_sorted"] = result["dynbatch_pooled"]["throughput"] / result["sorted"][best]["throughput"]
    if "dynbatch_whole_replies" in result:
        result["whole_replies_ratio_to_sorted"] = (result["dynbatch_whole_replies"]["throughput"]
                                                   / result["sorted"][best]["throughput"])
    if "dynbatch_shm_replies" in result:
        result["shm_replies_ratio_to_sorted"] = (result["dynbatch_shm_replies"]["throughput"]
                                                 / result["sorted"][best]["throughput"])
    result["targets"] = {"ratio_to_sorted": 0.9, "padding_waste": 0.15}
    save("gpu_text_case" if not args.smoke else "gpu_text_case_smoke", result, out)
    if not args.skip_pressure:
        result["pressure"] = pressure(args, requests, samples, load, size, out)
        save("gpu_text_case" if not args.smoke else "gpu_text_case_smoke", result, out)
    print(json.dumps({k: result[k] for k in ("ratio_to_sorted", "pooled_ratio_to_sorted", "shm_replies_ratio_to_sorted",
                                             "whole_replies_ratio_to_sorted", "best_sorted_budget") if k in result}),
          "padding", result["dynbatch"]["padding_waste"], flush=True)


def pressure(args, requests, samples, load, size, out: Path) -> dict:
    """dask-dynbatch and fixed pad-to-max batches, each on a fresh cluster started while a
    neighbour holds all but ``--hog-keep-gib`` of the GPU's memory."""
    import torch
    from distributed import Client, LocalCluster
    from gpu_case import HOG, release_hog, start_hog

    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    hog_path = out / "hog.py"
    hog_path.write_text(HOG)
    found = {}
    for contender in ("dynbatch", "padmax"):
        hog, _ = start_hog(hog_path, args.hog_keep_gib)
        try:
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                client.register_plugin(ddb.DynBatchPlugin())
                if contender == "dynbatch":
                    with ddb.Batcher(client, ddb.ModelSpec("text-encoder-pressure", load=load, pad_value=0)) as batcher:
                        futures = batcher.map(samples)
                        failed = sum(f.exception() is not None for f in futures)
                        worker = next(iter(batcher.stats()["workers"].values()))
                    found[contender] = {"failed": failed, "requests": len(samples),
                                        "memory_cap_tokens": worker["controller"].get("cap"),
                                        "padding_waste": worker["padding_waste"]}
                else:
                    found[contender] = {rows: client.submit(padmax_fixed, requests, int(rows), size, pure=False).result()
                                        for rows in args.padmax_batch.split(",")}
        finally:
            release_hog(hog)
        print("pressure", contender, found[contender], flush=True)
    hog_path.unlink(missing_ok=True)
    return found


if __name__ == "__main__":
    main()
