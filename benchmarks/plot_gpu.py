"""Plots of the GPU case: ``python benchmarks/plot_gpu.py`` reads benchmarks/results/gpu_case*.json
and writes a PNG beside each; ``python benchmarks/plot_gpu.py DIR/gpu_case.json ...`` plots those
files only (a PNG beside each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plot_main(r: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    labels, values, colors = [], [], []

    def bar(label, value, color):
        if value:
            labels.append(label)
            values.append(value)
            colors.append(color)

    for k, v in sorted(r.get("raw", {}).items(), key=lambda kv: int(kv[0])):
        bar(f"raw {k}", v, "#999")
    for k, v in sorted((r.get("raw_compiled") or {}).items(), key=lambda kv: int(kv[0])):
        bar(f"raw compiled {k}", v, "#bbb")
    for k, v in (r.get("plain") or {}).items():
        bar(k.replace("_", " "), v, "#c66")
    for key, label in (("dynbatch", "dynbatch default"), ("dynbatch_comm", "dynbatch, comm only"),
                       ("compiled", "dynbatch compile=True"), ("dask_cuda", "dynbatch on dask-cuda"),
                       ("hetero", "GPU + 2 CPU workers"), ("frontend", "data path alone (no model)")):
        bar(label, (r.get(key) or {}).get("throughput"), "#36c")
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title("ResNet-50 fp16, uint8 224x224 from the client")
    ol = r.get("open_loop") or []
    ax = axes[1]
    if ol:
        ax.plot([o["load"] for o in ol], [o["p50_ms"] for o in ol], "o-", label="p50")
        ax.plot([o["load"] for o in ol], [o["p99_ms"] for o in ol], "o-", label="p99")
        frozen = r.get("open_loop_gc_frozen") or []
        if frozen:
            ax.plot([o["load"] for o in frozen], [o["p99_ms"] for o in frozen], "o--", label="p99, gc.freeze() in the client")
        ax.axhline(r["latency_target_ms"], color="k", ls="--", label="latency target")
        ax.axhline(2 * r["latency_target_ms"], color="k", ls=":", label="2x target")
        ax.set_xlabel("offered load / closed-loop capacity")
        ax.set_ylabel("request latency ms")
        ax.set_title("open loop (Poisson)")
        ax.legend(fontsize=8)
    hist = (r.get("dynbatch") or {}).get("history") or []
    if hist and len(hist[0]) >= 8:  # (time, worker, size, latency, cap, compute_s, wait_s, stage_s[, device_batch, ...])
        ax = axes[2]
        t0 = hist[0][0]
        t = [h[0] - t0 for h in hist]
        if len(hist[0]) >= 9:  # since the rebuild: the device batch (the server's), beside the shipment
            ax.plot(t, [h[8] for h in hist], ".-", ms=3, lw=0.5, label="device batch")
            ax.plot(t, [h[2] for h in hist], ".", ms=2, alpha=0.5, label="shipment")
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.plot(t, [h[2] for h in hist], ".-", ms=3, lw=0.5, label="batch size")
        ax.set_xlabel("s (warm-up, then the timed closed loop)")
        ax.set_ylabel("batch size")
        ax2 = ax.twinx()
        ax2.plot(t, [h[5] * 1e3 for h in hist], "r.", ms=3, label="compute ms")
        ax2.plot(t, [h[7] * 1e3 for h in hist], "g.", ms=3, label="staging ms")
        ax2.set_ylabel("ms per batch on the worker")
        ax2.legend(fontsize=8, loc="upper left")
        ax.set_title("default settings: batch size and worker time per batch", fontsize=9)
    m = r["machine"]
    fig.suptitle(f"{m.get('gpu')} | torch {m.get('torch')} | dask {m.get('dask')} | {m.get('date')} | code {m.get('commit', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_pressure(p: dict | None, ax) -> None:
    if not p or "dynbatch" not in p:
        return
    d = p["dynbatch"]
    hist = d["history"]
    size = 5 if hist and len(hist[0]) > 5 else 1  # since the rebuild: (t, size, cap, latency, controller_size, device_batch)
    ax.plot([h[0] for h in hist], [h[size] for h in hist], "b.", ms=3, label="device batch" if size == 5 else "batch size")
    ax.plot([h[0] for h in hist], [h[2] for h in hist], "k-", lw=0.8, label="memory cap (rows)")
    ax.set_yscale("log")
    ax.set_xlabel("s since the hog first took the memory")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8, loc="lower right")
    ax2 = ax.twinx()
    ax2.plot([f[0] for f in p["free_gib"]], [f[1] for f in p["free_gib"]], "r-", lw=1)
    ax2.set_ylabel("free GPU memory, NVML (GiB)", color="r")
    for t, what in p.get("events", []):
        if "hog" in what and "fixed" not in what:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
    fixed = "; ".join(f"fixed {k.split('_')[1]}: {v['failed_chunks']} of {v['chunks']} chunks failed"
                      for k, v in p.items() if k.startswith("fixed_"))
    ax.set_title(f"a neighbour holds all but {p.get('hog_keep_gib')} GiB, lets go, takes it again: dask-dynbatch "
                 f"{d['failed']} of {d['requests']:,} failed\nplain Dask under the same neighbour: {fixed}", fontsize=8)


def main(argv: list[str] | None = None) -> None:
    """One PNG per result file: the main figure where it has the dynbatch closed loop, else the
    pressure figure where it has that section."""
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] if args else sorted(RESULTS.glob("gpu_case*.json"))
    for path in paths:
        r = json.loads(path.read_text())
        if "raw" in r and "dynbatch" in r:
            plot_main(r, path.with_suffix(".png"))
        elif r.get("pressure", {}).get("dynbatch"):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            plot_pressure(r["pressure"], ax)
            fig.tight_layout()
            fig.savefig(path.with_suffix(".png"), dpi=90)
        else:
            continue
        print("wrote", path.with_suffix(".png"), file=sys.stderr)


if __name__ == "__main__":
    main()
