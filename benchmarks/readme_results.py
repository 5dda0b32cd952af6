"""Rewrite the README's "Latest benchmark results" section from benchmarks/results/*.json.

    python benchmarks/readme_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "## Latest benchmark results", "## Configuration"


def load_result(name: str, required: bool = False) -> dict | None:
    """``benchmarks/results/<name>.json``, or None when that benchmark was not recorded (an error
    when it is ``required``)."""
    path = RESULTS / f"{name}.json"
    if not path.exists() and not required:
        return None
    return json.loads(path.read_text())


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def cpu_section(c: dict) -> str:
    same, d, dd, r = c["same_settings"], c["dynbatch"], c["dask_default"], c["ratios"]
    rows = [
        f"| raw model loop in the worker, best batch | {max(dd['raw'].values()):,.0f} | {max(same['raw'].values()):,.0f} |",
        f"| plain Dask, one task per request | {dd['one_task_per_request']:,.0f} | {same['one_task_per_request']:,.0f} |",
    ]
    rows += [f"| plain Dask, hand-chunked {k} | {dd[f'chunked_{k}']:,.0f} | {same[f'chunked_{k}']:,.0f} |" for k in (16, 64, 256)]
    rows += [f"| dask-dynbatch, `max_batch_size=64` | | {d['max64']['throughput']:,.0f} |",
             f"| dask-dynbatch, default settings | | {d['default']['throughput']:,.0f} |"]
    rows += [f"| dask-dynbatch, `max_batch_size={k}` | | {d[f'fixed{k}']['throughput']:,.0f} |" for k in (8, 32, 128, 512)]
    ol = ", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} ms / p99 {o['p99_ms']:.0f} ms" for o in c["open_loop"])
    m = c["machine"]
    return f"""**CPU case** (`cpu_case.json`, {m.get('cpu')}, {m['cpu_count']} cores, {m['date']}; 1 worker x 1 thread,
3-conv CNN on 64x64 uint8, {c['requests']:,} requests per contender after 4,000 to settle, all in one run;
images/s; noisy from run to run on this machine, so read ratios):

| contender | Dask default worker settings | same settings as dask-dynbatch |
|---|---|---|
""" + "\n".join(rows) + f"""

- `max_batch_size=64` vs the best hand-chunked: {r['max64_vs_best_chunked_same_settings']:.2f}x (target 1.1x: {met(r['max64_vs_best_chunked_same_settings'] >= 1.1)});
  vs one task per request: {r['max64_vs_one_task_per_request']:.1f}x (target 10x: {met(r['max64_vs_one_task_per_request'] >= 10)}).
- Default settings vs the best of the `max_batch_size` sweep: {r['default_vs_best_fixed']:.2f} (target 0.9: {met(r['default_vs_best_fixed'] >= 0.9)});
  vs the best hand-chunked: {r['default_vs_best_chunked_same_settings']:.2f}x (target 1.0: {met(r['default_vs_best_chunked_same_settings'] >= 1.0)}).
- Front end (no-op model): {c['front_end_requests_per_s']:,.0f} requests/s (target 20,000: {met(c['front_end_requests_per_s'] >= 20000)}).
- Open loop at 30/70/100 % of capacity: {ol} (latency target {c['open_loop_latency_target_ms']:.0f} ms).
- The worker allocator tuning lifts the raw model from {max(dd['raw'].values()):,.0f} to {max(same['raw'].values()):,.0f} images/s.

![CPU case](benchmarks/results/cpu_case.png)
"""


def gpu_section(g: dict, h: dict | None) -> str:
    rows = [f"| raw model loop, batch {k}, input on the GPU | {v:,.0f} | {v / g['ceiling']:.0%} |"
            for k, v in sorted(g["raw"].items(), key=lambda kv: int(kv[0]))]
    rows += [f"| plain Dask, {k.replace('_', ' ')} | {v:,.0f} | {v / g['ceiling']:.0%} |" for k, v in g["plain"].items()]
    for key, label in (("dynbatch", "dask-dynbatch, default settings (LocalCluster)"),
                       ("dask_cuda", "dask-dynbatch on dask-cuda's LocalCUDACluster"),
                       ("shared_gpu", "dask-dynbatch, two workers sharing the GPU"),
                       ("hetero", "dask-dynbatch, GPU worker + 2 CPU workers")):
        if g.get(key):
            v = g[key]["throughput"]
            rows.append(f"| {label} | {v:,.0f} | {v / g['ceiling']:.0%} |")
    ol = g["open_loop"]
    p99_70 = next(o["p99_ms"] for o in ol if o["load"] == 0.7)
    text = ", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} ms / p99 {o['p99_ms']:.0f} ms" for o in ol)
    m = g["machine"]
    out = f"""**GPU case** (`gpu_case.json`, {m.get('gpu')}, torch {m.get('torch')}, dask {m.get('dask')}, {m['date']};
ResNet-50 fp16 channels-last, random weights, uint8 224x224 images sent from the client; images/s):

| contender | images/s | of the ceiling |
|---|---|---|
""" + "\n".join(rows) + f"""

- dask-dynbatch vs the raw ceiling of the same run: {g['dynbatch']['ratio_to_ceiling']:.0%} (target 85 %: {met(g['dynbatch']['ratio_to_ceiling'] >= 0.85)}).
- Open loop: {text}; p99 at 70 % load vs 2x the {g['latency_target_ms']:.0f} ms target: {met(p99_70 <= 2 * g['latency_target_ms'])}.
- CuPy MLP: {g['cupy']['throughput']:,.0f} samples/s, largest difference to NumPy {g['cupy']['max_abs_error_vs_numpy']:.1e}.
"""
    if h and h.get("pressure"):
        p = h["pressure"]
        out += (f"- Memory pressure (`gpu_case_pressure_hetero.json`): another process took most of the GPU's memory mid-run; "
                f"{p['failed']} of {p['requests']:,} requests failed; hand-chunked batches of 512 meanwhile: "
                f"{p['fixed_512_failed_chunks']} of {p['fixed_512_chunks']} failed with CUDA out-of-memory.\n")
    if h and h.get("hetero"):
        x = h["hetero"]
        out += (f"- GPU + 2 CPU workers (same file): {x['ratio_to_gpu_only']:.2f}x the GPU worker alone; the GPU worker served "
                f"{max(w['samples'] for w in x['workers'].values()) / sum(w['samples'] for w in x['workers'].values()):.1%} of the samples.\n")
    cur = load_result("gpu_case_current")
    if cur is not None:
        best_chunked = max(cur["plain"][k] for k in cur["plain"] if k.startswith("chunked"))
        p99 = next(o["p99_ms"] for o in cur["open_loop"] if o["load"] == 0.7)
        out += (f"- The full run above predates two defaults changed since (`max_inflight` 4 -> 3, the controller's "
                f"throughput tolerance 10 % -> 20 %). Rerun of raw/plain/dynbatch/open with the current defaults "
                f"(`gpu_case_current.json`, {cur['machine']['date']}): dask-dynbatch {cur['dynbatch']['throughput']:,.0f} images/s = "
                f"{cur['dynbatch']['ratio_to_ceiling']:.0%} of the ceiling ({cur['ceiling']:,.0f}), "
                f"{cur['dynbatch']['throughput'] / best_chunked:.2f}x the best hand-chunked ({best_chunked:,.0f}); "
                f"open-loop p99 at 70 % load {p99:.0f} ms.\n")
    return out + "\n![GPU case](benchmarks/results/gpu_case.png)\n"


def placement_section() -> str:
    p = load_result("placement_case")
    if p is None:
        return ""
    return (f"**Heterogeneous placement** (`placement_case.json`, `python benchmarks/placement_case.py`): two CPU "
            f"workers, one 3x slower for the same model, {p['requests']:,} requests: the fast worker served "
            f"{p['fast_share']:.1%} against its throughput share of {p['fast_throughput_share']:.1%} (floor: within 15 %: "
            f"{met(p['share_error'] <= 0.15)}); makespan {p['makespan_vs_ideal']:.2f}x the proportional ideal "
            f"(floor 1.15x: {met(p['makespan_vs_ideal'] <= 1.15)}; a 1-second run, noisy from run to run).\n")


def compile_section() -> str:
    r = load_result("gpu_compile")
    if r is None:
        return ""
    c, m = r["compiled"], r["machine"]
    eager, compiled = r["ceiling"], r["compiled_ceiling"]
    state = c.get("compile") or {}
    return (f"**Compiled execution** (`gpu_compile.json`, {m.get('gpu')}, torch {m.get('torch')}, {m['date']}; "
            f"`python benchmarks/gpu_case.py --sections raw,rawcompiled,dynbatch,compiled`): raw ceilings of the "
            f"same run, eager {eager:,.0f} and `torch.compile` {compiled:,.0f} images/s ({compiled / eager:.2f}x); "
            f"dask-dynbatch with `compile=True` {c['throughput']:,.0f} images/s end to end = "
            f"{c['ratio_to_eager_ceiling']:.2f}x the eager ceiling (target 1.4x: {met(c['ratio_to_eager_ceiling'] >= 1.4)}); "
            f"default eager dask-dynbatch in the same run {r['dynbatch']['throughput']:,.0f}. Of all its batches "
            f"{state.get('compiled_batches', 0):,} ran compiled and {state.get('eager_batches', 0):,} eagerly: buckets kept "
            f"compiling ({state.get('compile_seconds', 0):.0f} s in all, {len(state.get('ready') or [])} buckets), and while one "
            f"compiles every batch runs eagerly. That run predates compiling each bucket in a child process first "
            f"(next paragraph; not yet measured on a GPU).\n")


def cpu_compile_section() -> str:
    r = load_result("cpu_compile")
    if r is None:
        return ""
    c = r["compiled"]
    buckets = (c.get("compile") or {}).get("buckets") or {}
    child = [b["warm_seconds"] for b in buckets.values() if b.get("warm_seconds")]
    here = [b["seconds"] - b["warm_seconds"] for b in buckets.values() if b.get("warm_seconds") and b.get("seconds")]
    if not child:
        return ""
    return (f"**Compiled, on this CPU** (`cpu_compile.json`, `DYNBATCH_SMOKE=1 python benchmarks/gpu_case.py --sections "
            f"raw,rawcompiled,dynbatch,compiled`: the tiny CNN instead of ResNet-50): each bucket compiled in a child "
            f"process first ({min(child):.1f}-{max(child):.1f} s), then in the worker from warm caches in "
            f"{min(here):.1f}-{max(here):.1f} s, the only time its batches ran eagerly because of a compile; "
            f"{c['compile']['compiled_batches']:,} batches ran compiled, {c['compile']['eager_batches']:,} eagerly. "
            f"`compile=True` {c['throughput']:,.0f} images/s vs default {r['dynbatch']['throughput']:,.0f} "
            f"(raw: eager {r['ceiling']:,.0f}, compiled {r['compiled_ceiling']:,.0f}: inductor gains little on this small "
            f"CPU model).\n")


def multigpu_section() -> str:
    r = load_result("gpu_multigpu")
    if r is None:
        return ""
    g, m = r["multigpu"], r["machine"]
    u = g["unequal"]
    workers = u["workers"]
    hog_worker = next(a for a, gpu in u["worker_gpu"].items() if gpu == str(u["hog_gpu"]))
    other = next(a for a in workers if a != hog_worker)
    return (f"**Several GPUs** (`gpu_multigpu.json`, {m.get('gpu', '').replace(chr(10), ' + ')}, {m['date']}; `--sections multigpu`, "
            f"LocalCUDACluster): 1 GPU {g['one_gpu']['throughput']:,.0f}, {g['gpus']} GPUs {g['all_gpus']['throughput']:,.0f} "
            f"images/s = {g['scaling']:.2f}x (target 1.8x: {met(g['scaling'] >= 1.8)}). GPUs made unequal (another process "
            f"holds all but {u['hog_keep_gib']:.0f} GiB of GPU {u['hog_gpu']}): memory cap {workers[hog_worker]['memory_cap']} "
            f"vs {workers[other]['memory_cap']} rows, mean batch {workers[hog_worker]['mean_batch']:.0f} vs "
            f"{workers[other]['mean_batch']:.0f}, share of work {u['shares'][hog_worker]:.0%} vs {u['shares'][other]:.0%}, "
            f"{u['failed']} of {u['requests']:,} requests failed, {u['throughput']:,.0f} images/s.\n")


def main() -> None:
    c, g = load_result("cpu_case", required=True), load_result("gpu_case", required=True)
    h = load_result("gpu_case_pressure_hetero")
    section = f"""{START}
Recorded under `benchmarks/results/` (JSON with the machine stamp, plus PNG); this section is written
by `python benchmarks/readme_results.py`. Rerun with `python benchmarks/cpu_case.py` (about 7 minutes
here) and, on a GPU machine, `python benchmarks/gpu_case.py --sections
raw,plain,dynbatch,open,cupy,pressure,hetero,shared,daskcuda` (then `python benchmarks/plot_gpu.py`).

{cpu_section(c)}
{placement_section()}
{gpu_section(g, h)}
{compile_section()}
{cpu_compile_section()}
{multigpu_section()}
"""
    readme = ROOT / "README.md"
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(before + section + END + after)


if __name__ == "__main__":
    main()
