"""Rewrite the "Latest results" section of benchmarks/README.md from benchmarks/results/*.json.

    python benchmarks/readme_results.py              # into benchmarks/README.md
    python benchmarks/readme_results.py --target FILE
    python benchmarks/readme_results.py --print      # the section on stdout, nothing written

The section goes between the lines ``## Latest results`` and ``## Earlier results`` of the target;
image links are written relative to the target's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "## Latest results", "## Earlier results"
#: where results/ is seen from the file the section goes into (set by main)
_LINK_BASE = ROOT


def link(path: str) -> str:
    """``path`` (relative to the repository root) as a link from the target file's folder."""
    return os.path.relpath(ROOT / path, _LINK_BASE)


def load_result(name: str, required: bool = False) -> dict | None:
    """``benchmarks/results/<name>.json``, or None when that benchmark was not recorded (an error
    when it is ``required``)."""
    path = RESULTS / f"{name}.json"
    if not path.exists() and not required:
        return None
    return json.loads(path.read_text())


def stamp(m: dict) -> str:
    """Where and when a result was recorded: the GPU, or the CPU and its cores; date; commit."""
    where = m.get("gpu") or f"{m.get('cpu')}, {m['cpu_count']} cores"
    return f"{where}, {m['date']}, commit {m.get('commit')}"


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
    rounds = len(next(iter(d.values())).get("throughputs") or [1])
    per_round = "; ".join(
        f"round {i + 1}: {x['max64_vs_best_chunked']:.2f} / {x['default_vs_best_fixed']:.2f} / {x['default_vs_best_chunked']:.2f}"
        for i, x in enumerate(c.get("round_ratios", [])))
    return f"""**CPU case** (`cpu_case.json`, {m.get('cpu')}, {m['cpu_count']} cores, {m['date']}; 1 worker x 1 thread,
3-conv CNN on 64x64 uint8, {c['requests']:,} requests per contender after 4,000 to settle, all in one run: each
contender, the plain-Dask baselines included, once in each of {rounds} rounds, the order rotated from round to
round, figures the means; images/s; noisy from run to run on this machine, so read ratios):

| contender | Dask default worker settings | same settings as dask-dynbatch |
|---|---|---|
""" + "\n".join(rows) + f"""

- `max_batch_size=64` vs the best hand-chunked: {r['max64_vs_best_chunked_same_settings']:.2f}x (target 1.1x: {met(r['max64_vs_best_chunked_same_settings'] >= 1.1)});
  vs one task per request: {r['max64_vs_one_task_per_request']:.1f}x (target 10x: {met(r['max64_vs_one_task_per_request'] >= 10)}).
- Default settings vs the best of the `max_batch_size` sweep: {r['default_vs_best_fixed']:.2f} (target 0.9: {met(r['default_vs_best_fixed'] >= 0.9)});
  vs the best hand-chunked: {r['default_vs_best_chunked_same_settings']:.2f}x (target 1.0: {met(r['default_vs_best_chunked_same_settings'] >= 1.0)}).
{"- Each round's own ratios (max64 / best chunked, default / best fixed, default / best chunked): " + per_round + "." + chr(10) if per_round else ""}- Front end (no-op model, `map()` of 100,000 rows and every result, in the process that ran the contenders above): {c['front_end_requests_per_s']:,.0f} requests/s (target 100,000: {met(c['front_end_requests_per_s'] >= 100_000)}; see `docs/decisions.md` on the garbage collector).
- Default settings vs the raw loop's best batch: {c['ratios']['default_vs_raw_best']:.2f} (target 0.85: {met(c['ratios']['default_vs_raw_best'] >= 0.85)}; `cpu_budget.json` below says where the cores go).
- Open loop at 30/70/100 % of capacity: {ol} (latency target {c['open_loop_latency_target_ms']:.0f} ms).
- The worker allocator tuning lifts the raw model from {max(dd['raw'].values()):,.0f} to {max(same['raw'].values()):,.0f} images/s.
{previous_cpu_runs()}
![CPU case]({link("benchmarks/results/cpu_case.png")})
"""


def previous_cpu_runs() -> str:
    """The same ratios from runs kept in earlier/ (see its README for what each ran)."""
    lines = []
    for name, what in (("cpu_case_run22_3ff66c0", "the front end's garbage work, recorded before this one"),
                       ("cpu_case_run21_a20ab76", "the rebuild"),
                       ("cpu_case_previous_62afcda", "the code before the rebuild, run right after run21"),
                       ("cpu_case_run20_a20ab76", "the rebuild, run just before run21"),
                       ("cpu_case_run19_7b6f4c0", "the last recorded run before the rebuild"),
                       ("cpu_case_run18", "earlier code"), ("cpu_case_run17", "earlier code")):
        r = load_result(f"earlier/{name}")
        if r is None:
            continue
        x = r["ratios"]
        lines.append(f"- `earlier/{name}.json` ({r['machine']['date']}, {what}): "
                     f"max64 / best chunked {x['max64_vs_best_chunked_same_settings']:.2f}x, default / best fixed "
                     f"{x['default_vs_best_fixed']:.2f}, default / best chunked {x['default_vs_best_chunked_same_settings']:.2f}x.")
    return "\n".join(lines) + ("\n" if lines else "")


def pauses(open_loop: list[dict], load: float) -> str:
    """The client's garbage-collection pauses over 10 ms in the open-loop run at ``load``."""
    run = next(o for o in open_loop if o["load"] == load)
    got = [p[2] for p in run.get("client_gc", {}).get("pauses_over_min", [])]
    return ", ".join(f"{x * 1e3:.0f}" for x in got) + " ms" if got else "none over 10 ms"


def pressure_story(q: dict) -> str:
    """What the neighbour did and how cap and batch size followed, from the pressure section's events,
    the hog's own log and the batch history (time, size, memory cap, ...; seconds since its origin)."""
    import re

    held = [float(x) for x in re.findall(r"hog holds ([0-9.]+) GiB", q.get("hog_output", ""))]
    events = {name: t for t, name in q["events"]}
    released, again, again_off = events.get("hog released"), events.get("hog holds again"), events.get("hog released again")
    hist = q["dynbatch"]["history"]
    size = 5 if hist and len(hist[0]) > 5 else 1  # since the rebuild: the device batch, not the shipment

    def phase(t0, t1):
        rows = [h for h in hist if (t0 is None or h[0] >= t0) and (t1 is None or h[0] < t1)]
        caps = sorted(h[2] for h in rows if h[2])
        sizes = [h[size] for h in rows]
        return (caps[len(caps) // 2] if caps else None), (min(sizes), max(sizes)) if sizes else (None, None)

    cap1, (lo1, hi1) = phase(None, released)
    cap2, (lo2, hi2) = phase(released, again)
    cap3, (lo3, hi3) = phase(again, again_off)
    first = f"{held[0]:.0f} GiB" if held else "most of the GPU"
    second = f"{held[1]:.0f} GiB, all but {q['hog_keep_gib']:.0f} GiB of what was free then" if len(held) > 1 else "memory again"
    return (f"another process held {first} (all but {q['hog_keep_gib']:.0f} GiB) when dask-dynbatch started: median memory "
            f"cap {cap1:,} rows, batches of {lo1}-{hi1}; it let go: cap {cap2:,}, batches up to {hi2:,}; it took {second}: "
            f"cap {cap3:,}, batches of {lo3:,}-{hi3:,}; it let go again")


def gpu_section(g: dict, p: dict | None) -> str:
    """The full GPU run (``gpu_case.json``, compiled section included) and the pressure run
    (``gpu_case_pressure.json``)."""
    ceiling = g["ceiling"]
    rows = [f"| raw model loop, batch {k}, input on the GPU | {x:,.0f} | {x / ceiling:.0%} |"
            for k, x in sorted(g["raw"].items(), key=lambda kv: int(kv[0]))]
    rows += [f"| raw `torch.compile` loop, batch {k} | {x:,.0f} | {x / ceiling:.0%} |"
             for k, x in sorted((g.get("raw_compiled") or {}).items(), key=lambda kv: int(kv[0]))]
    rows += [f"| plain Dask, {k.replace('_', ' ')} | {x:,.0f} | {x / ceiling:.0%} |" for k, x in g["plain"].items()]
    for key, label in (("dynbatch", "dask-dynbatch, default settings"),
                       ("dask_cuda", "dask-dynbatch on dask-cuda's LocalCUDACluster"),
                       ("compiled", "dask-dynbatch, `compile=True, max_batch_size=512`"),
                       ("frontend_gpu", "the data path to the GPU alone: same images, a module that returns 8 values")):
        if g.get(key):
            x = g[key]["throughput"]
            rows.append(f"| {label} | {x:,.0f} | {x / ceiling:.0%} |")
    m = g["machine"]
    d = g["dynbatch"]
    best_chunked = max(x for k, x in g["plain"].items() if k.startswith("chunked"))
    out = f"""**GPU case** (`gpu_case.json`, {m.get('gpu')}, torch {m.get('torch')}, dask {m.get('dask')}, {m['date']}, code at
commit {m.get('commit')}; ResNet-50 fp16 channels-last, random weights, uint8 224x224 images sent from the client;
each closed loop: 40,000 requests timed after three untimed passes of the same; images/s):

| contender | images/s | of the eager ceiling |
|---|---|---|
""" + "\n".join(rows) + "\n\n"
    p99_70 = next(o["p99_ms"] for o in g["open_loop"] if o["load"] == 0.7)
    ol = ", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} / p99 {o['p99_ms']:.0f} ms" for o in g["open_loop"])
    out += (f"- dask-dynbatch with default settings: **{d['ratio_to_ceiling']:.0%}** of the eager ceiling (target 95 %: "
            f"{met(d['ratio_to_ceiling'] >= 0.95)}), {d['throughput'] / best_chunked:.1f}x the best hand-chunked Dask; "
            f"its first pass right after the model loaded ran at {d['first_pass_throughput']:,.0f} "
            f"({d['first_pass_throughput'] / ceiling:.0%}), while the controller climbed.\n")
    harness = g["open_loop"][0].get("harness", "every future kept to the end of the run")
    caveat = f" **This run's open loop {g['open_loop_caveat']}.**" if g.get("open_loop_caveat") else ""
    small = small_batch_ms(g)
    host = f" A batch of 20-60 rows ran {small:.1f} ms on the worker here (median, 30 % load)." if small else ""
    out += (f"- Open loop (Poisson arrivals, 6 s per load; harness: {harness}):{caveat} {ol}; p99 at 70 % load vs 2x the "
            f"{g['latency_target_ms']:.0f} ms target: {met(p99_70 <= 2 * g['latency_target_ms'])}. The client's "
            f"garbage-collection pauses over 10 ms: {pauses(g['open_loop'], 0.7)} at 70 %, "
            f"{pauses(g['open_loop'], 1.0)} at 100 % (where requests queue up and live longer).{host}\n")
    frozen = g.get("open_loop_gc_frozen")
    if frozen:
        olf = ", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} / p99 {o['p99_ms']:.0f} ms" for o in frozen)
        out += (f"- The same open loop with `gc.freeze()` in the client before each load (see Configuration): {olf}; "
                f"its pauses at 70 %: {pauses(frozen, 0.7)}.\n")
    fg = g.get("frontend_gpu")
    if fg:
        out += (f"- The data path to the GPU alone (page-locked shared memory, DMA): {fg['throughput']:,.0f} images/s, "
                f"{fg['mean_stage_ms']:.1f} ms of staging per batch of ~{fg['mean_rows']:.0f}.\n")
    if g.get("compiled"):
        c, st = g["compiled"], g["compiled"]["compile"]
        counters = c.get("dynamo_counters") or {}
        recompiled = counters.get("before") != counters.get("after")
        gcs = st.get("gc") or {}
        out += (f"- `compile=True`: raw compiled ceiling {g['compiled_ceiling']:,.0f} = "
                f"{g['compiled_ceiling'] / ceiling:.2f}x the eager ceiling; end to end, once buckets {st['ready']} were "
                f"ready ({st['compile_seconds']:.0f} s of compiling in the background, {st['eager_batches']:,} batches "
                f"served eagerly meanwhile), untimed passes of 40,000 ran at "
                f"{', '.join(f'{x:,.0f}' for x in c['untimed_passes'])} and the timed 120,000 at {c['throughput']:,.0f}: "
                f"**{c['ratio_to_eager_ceiling']:.2f}x** the eager ceiling (target 1.5x: "
                f"{met(c['ratio_to_eager_ceiling'] >= 1.5)}), {c['ratio_to_compiled_ceiling']:.0%} of the compiled one; "
                f"{'dynamo compiled again during the passes' if recompiled else 'dynamo compiled nothing during the passes'}"
                + (f", {gcs.get('full_collections', 0)} full collection in the worker ({gcs.get('total_s', 0):.2f} s)"
                   if gcs else "") + ".\n")
    if p and p.get("pressure", {}).get("dynbatch"):
        q = p["pressure"]
        dq = q["dynbatch"]
        fixed = ", ".join(f"chunks of {k.split('_')[1]}: {v['failed_chunks']} of {v['chunks']} failed"
                          for k, v in q.items() if k.startswith("fixed_"))
        out += (f"- Memory pressure (`gpu_case_pressure.json`, {p['machine'].get('gpu', '').split(',')[0]}, commit "
                f"{p['machine'].get('commit')}): {pressure_story(q)}: **{dq['failed']} of {dq['requests']:,}** requests "
                f"failed. Plain Dask under the same neighbour (fresh worker): {fixed}, CUDA out of memory.\n")
    x = g.get("hetero")
    if x:
        total = sum(w["samples"] for w in x["workers"].values())
        out += (f"- GPU + 2 CPU workers: {x['ratio_to_gpu_only']:.2f}x the GPU worker alone; the GPU worker served "
                f"{max(w['samples'] for w in x['workers'].values()) / total:.1%} of the samples.\n")
    if g.get("dask_cuda"):
        metrics = next(iter(g["dask_cuda"]["scheduler_gpu_metrics"].values()))
        out += (f"- dask-cuda: `LocalCUDACluster` works unchanged ({g['dask_cuda']['throughput']:,.0f} images/s); the scheduler "
                f"sees its NVML metrics ({', '.join(sorted(metrics))}).\n")
    out += (f"- CuPy MLP: {g['cupy']['throughput']:,.0f} samples/s, largest difference to NumPy "
            f"{g['cupy']['max_abs_error_vs_numpy']:.1e}.\n")
    out += other_gpu_runs()
    out += f"\n![GPU case]({link('benchmarks/results/gpu_case.png')})\n"
    if p and p.get("pressure", {}).get("dynbatch"):
        out += f"\n![memory pressure]({link('benchmarks/results/gpu_case_pressure.png')})\n"
    return out


#: GPU runs after the main table's, and the runs of the same session before it (see earlier/README.md)
OTHER_GPU_RUNS = ("earlier/gpu_h100_final_b855689", "earlier/gpu_h100_9103f70", "earlier/gpu_h100_s7_numpy_ce4c9b6", "earlier/gpu_h100_s7_write_ce4c9b6", "earlier/gpu_h100_s7_012b44e",
                  "earlier/gpu_h100_open_1b4117e", "earlier/gpu_h200_s6_07eb74f", "earlier/gpu_h100_ab3_4715a18",
                  "earlier/gpu_h100_ab2_07eb74f", "earlier/gpu_h100_ab1_4715a18", "earlier/gpu_h100_warmup_4715a18",
                  "earlier/gpu_h100_3c04b38")


def small_batch_ms(r: dict) -> float | None:
    """Median worker compute time of the batches of 20-60 rows in a run's 30 % open loop: how
    launch-bound its host was."""
    for o in r.get("open_loop") or []:
        if o["load"] == 0.3 and o.get("history"):
            columns = o["history_columns"]
            # since the rebuild a shipment may run in device batches with other rows: their size counts
            size = columns.index("device_batch" if "device_batch" in columns else "size")
            compute = columns.index("compute_s")
            small = sorted(h[compute] for h in o["history"] if 20 <= h[size] <= 60 and h[compute])
            if small:
                return small[len(small) // 2] * 1e3
    return None


def p99_at_70(r: dict) -> float | None:
    return next((o["p99_ms"] for o in r.get("open_loop") or [] if o["load"] == 0.7), None)


#: the runs among OTHER_GPU_RUNS at code with the per-size pacing forecast (012b44e on)
PER_SIZE_FORECAST_RUNS = OTHER_GPU_RUNS[:5]


def other_gpu_runs() -> str:
    """One line per GPU run of the session: card, commit, how launch-bound its host was (raw batch
    64 against 512), the closed loop against the eager ceiling, open-loop p99 at 70 %, compiled."""
    lines = []
    for name in OTHER_GPU_RUNS:
        r = load_result(name)
        if r is None:
            continue
        m, parts = r["machine"], []
        small = small_batch_ms(r)
        if small is not None:
            parts.append(f"a batch of 20-60 rows ran {small:.1f} ms on the worker (median, 30 % load)")
        d = r.get("dynbatch") or {}
        if d.get("ratio_to_ceiling"):
            parts.append(f"closed loop {d['ratio_to_ceiling']:.1%} of the eager ceiling")
        elif d.get("throughput"):
            parts.append(f"closed loop {d['throughput']:,.0f} images/s")
        for o in r.get("open_loop") or []:
            if o["load"] == 0.7:
                parts.append(f"open-loop p50 / p99 at 70 %: {o['p50_ms']:.0f} / {o['p99_ms']:.0f} ms")
        if r.get("compiled"):
            parts.append(f"`compile=True` {r['compiled']['ratio_to_eager_ceiling']:.2f}x")
        if r.get("open_loop_caveat"):
            parts.append(f"its open loop {r['open_loop_caveat']}")
        lines.append(f"- `{name}.json` ({m.get('gpu', '').split(',')[0]}, commit {m.get('commit')}, {m['date']}): "
                     + "; ".join(parts) + ".")
    if not lines:
        return ""
    forecast = [load_result(n) for n in PER_SIZE_FORECAST_RUNS]
    slow = [p99_at_70(r) for r in forecast if r and (small_batch_ms(r) or 0) >= 6.0 and p99_at_70(r)]
    with_it = f"; with it, p99 {min(slow):.0f}-{max(slow):.0f} ms on such hosts" if slow else ""
    return ("\n**Earlier GPU runs of 2026-12-06, before the rebuild** (newest first; the first five at the code "
            "with the per-size pacing forecast, the first two at the last code before the rebuild). Before that forecast the open loop at 70 % load depended on the host: where a "
            "small batch cost the worker 4-6 ms it was met, where it cost 6.5-10 ms the forecast (one average "
            "time per row, learned from the 30 % load's small batches) put the device's end 2-5x too late, "
            "partial batches stopped overlapping the device and batches of 1,000 rows formed at the start of "
            f"every 70 % run (`dask_dynbatch/core/pacing.py` since the rebuild){with_it}:\n"
            + "\n".join(lines) + "\n")


def earlier_gpu_section() -> str:
    """Several GPUs and GPU + CPU workers: recorded before the fp16 fix (see earlier/README.md)."""
    p = None  # memory pressure: measured again in fp16 (gpu_case_pressure.json)
    mg = load_result("earlier/gpu_multigpu_h100_fp32")
    if p is None and mg is None:
        return ""
    out = ("**Earlier GPU runs, model in fp32** (`benchmarks/results/earlier/*_h100_fp32.json`, H100s, 2026-11-25): "
           "until commit 87379b1 `load(device='cpu')` was called without the device, so `build_resnet50` built its CPU "
           "variant (fp32, NCHW) and every GPU run before it measured an fp32 ResNet-50 (ceiling ~7,500 instead of ~17,000 "
           "images/s). Not rerun since (no device time left):")
    if p and p.get("pressure"):
        q = p["pressure"]
        out += (f" under memory pressure {q['failed']} of {q['requests']:,} requests failed while hand-chunked batches of 512 "
                f"failed {q['fixed_512_failed_chunks']} of {q['fixed_512_chunks']} times with CUDA out-of-memory;")
    if mg and mg.get("multigpu"):
        g = mg["multigpu"]
        out += f" 2 GPUs gave {g['scaling']:.2f}x one GPU, and {g['unequal']['failed']} of {g['unequal']['requests']:,} requests failed with one GPU nearly full."
    return out + "\n"


def pipeline_section() -> str:
    """The three-stage pipeline (``pipeline_case.json`` here, ``pipeline_case_gpuhost.json`` on a 16-core host)."""
    lines = []
    for name in ("pipeline_case", "pipeline_case_gpuhost"):
        r = load_result(name)
        if r is None:
            continue
        m = r["machine"]
        where = (f"the {m['cpu_count']}-core host of a lent {m['gpu'].split(',')[0]}, CPU only" if m.get("gpu")
                 else f"the {m['cpu_count']}-core CPU machine")
        parts = []
        for setup in ("shared", "split", "io"):
            x = r.get(setup)
            if not x:
                continue
            stages = "/".join(f"{x['median_rate'][k]:,.0f}" for k in ("pre", "model", "post"))
            slowest = min(x["median_rate"][k] for k in ("pre", "model", "post"))
            # what the machine's cores allow at the CPU time the pipeline spent per job (all processes)
            cpu_bound = r["machine"]["cpu_count"] * 1e3 / x["median_cpu_ms_per_job"]["pipeline"] / slowest
            bound = (f"; the cores allow at most {cpu_bound:.2f}x at its {x['median_cpu_ms_per_job']['pipeline']:.2f} ms "
                     f"of CPU per job" if cpu_bound < 1.5 else "")
            parts.append(f"`{setup}` (stages alone {stages} jobs/s): pipeline "
                         f"{x['ratios']['pipeline_vs_slowest_stage_alone']:.2f}x the slowest stage (floor 0.8: "
                         f"{met(x['ratios']['pipeline_vs_slowest_stage_alone'] >= 0.8)}{bound}), high-priority median latency "
                         f"{x['priority']['high_over_low_median']:.2f} of low's (target at most 0.2: "
                         f"{met(x['priority']['high_over_low_median'] <= 0.2)})")
        lines.append(f"- `{name}.json` ({where}, {r['machine']['date']}): " + "; ".join(parts) + ".")
    if not lines:
        return ""
    return ("**Pipeline: CPU -> model -> CPU** (`python benchmarks/pipeline_case.py`; setups: `shared` all three stages "
            "NumPy on the same cores, `split` pre and post each on its own worker beside a simulated accelerator, `io` "
            "pre and post waiting on I/O; on 2 cores, `shared` and `split` have no free core to overlap on):\n"
            + "\n".join(lines) + "\n")


def placement_section() -> str:
    p = load_result("placement_case")
    if p is None:
        return ""
    return (f"**Heterogeneous placement** (`placement_case.json`, `python benchmarks/placement_case.py`): two CPU "
            f"workers, one 3x slower for the same model, {p['requests']:,} requests: the fast worker served "
            f"{p['fast_share']:.1%} against its throughput share of {p['fast_throughput_share']:.1%} (floor: within 15 %: "
            f"{met(p['share_error'] <= 0.15)}); makespan {p['makespan_vs_ideal']:.2f}x the proportional ideal "
            f"(floor 1.15x: {met(p['makespan_vs_ideal'] <= 1.15)}; a 1-second run){earlier_placement()}.\n")


def earlier_placement() -> str:
    runs = [load_result(f"earlier/placement_case_run{i}") for i in (1, 2)]
    runs = [r for r in runs if r is not None]
    if not runs:
        return ""
    return ("; the runs before it with the same code (`earlier/placement_case_run*.json`): makespan "
            + ", ".join(f"{r['makespan_vs_ideal']:.2f}x" for r in runs) + ", share error "
            + ", ".join(f"{r['share_error']:.1%}" for r in runs))


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


def sharing_section() -> str:
    """Two client processes on one model (``sharing_case.json``)."""
    r = load_result("sharing_case")
    if r is None:
        return ""
    m, mean, cfg = r["machine"], r["means"], r["config"]
    rounds = "; ".join(f"round {i + 1}: {x['b_over_a']:.2f}, p99 ratio {x['p99_ratio']:.2f}"
                       for i, x in enumerate(r["rounds"]))
    return (f"**Sharing** (`sharing_case.json`, `python benchmarks/sharing_case.py`; {m.get('cpu')}, "
            f"{m['cpu_count']} cores, {m['date']}): one worker x 1 thread, a model that sleeps 4 ms + 50 us per row; "
            f"two client processes, {cfg['requests']:,} requests each in closed loop, {r['rounds_run']} rounds, the "
            f"order rotated, means: "
            f"one client {mean['a_throughput']:,.0f} requests/s, two clients together {mean['b_throughput']:,.0f} "
            f"(**{mean['b_over_a']:.2f}x**, target 0.9: {met(mean['b_over_a'] >= 0.9)}; "
            f"{mean['b_shared_fraction']:.0%} of their device batches held rows of both), the model loaded "
            f"{r['loads']} time(s) on the worker (target 1: {met(r['loads'] == 1)}); open loop, each client at "
            f"{cfg['open_fraction']:.0%} of one client's throughput: p99 {mean['c_p99_ms'][0]:.0f} / "
            f"{mean['c_p99_ms'][1]:.0f} ms, larger / smaller {mean['p99_ratio']:.2f} (target at most 1.5: "
            f"{met(mean['p99_ratio'] <= 1.5)}). Per round (two / one, p99 ratio): {rounds}.\n")


def growth_section() -> str:
    """Throughput and latency for 1, 2, 4 client processes against 1, 2, 4 workers (``growth_case.json``)."""
    r = load_result("growth_case")
    if r is None:
        return ""
    m, cfg, combos = r["machine"], r["config"], r["combinations"]
    rows = [f"| {c['workers']} | {c['clients']} | {c['ideal']:,.0f} | {c['throughput']:,.0f} | {c['of_ideal']:.0%} | "
            f"{c['open']['p50_ms']:.0f} | {c['open']['p99_ms']:.0f} | {c['open']['mean_device_batch']:.0f} "
            f"({c['open']['shared_fraction']:.0%}) | "
            + " / ".join(f"{c['cpu_ms_per_1000'][k]:.0f}" for k in ("clients", "workers", "scheduler_and_nannies"))
            + f" | {c['cpu_cores_busy']:.2f} |" for c in combos]
    one = [c for c in combos if c["clients"] == 1]
    more = [c for c in combos if c["clients"] > 1]

    def on_worker(c):  # median ms a shipment waited on the worker beyond the device thread and the model
        return max(x["worker_s"] - x["wait_s"] - x["compute_s"] for x in c["open"]["shipment_ms"])

    return (f"**Cost of growth** (`growth_case.json`, `python benchmarks/growth_case.py`; {stamp(m)}): a model that sleeps "
            f"{cfg['fixed_s'] * 1e3:.0f} ms + {cfg['per_row_s'] * 1e6:.0f} us per row (the cores carry only the "
            f"package), `max_batch_size={cfg['max_batch_size']}`, so the ideal is 4,000 requests/s per worker; each "
            f"client process its own Dask client and Batcher of the same model; closed loop of {cfg['requests']:,} "
            f"requests shared by the clients ({cfg['passes']} passes, mean), then Poisson arrivals at "
            f"{cfg['open_load']:.0%} of that combination's closed loop for {cfg['open_seconds']:.0f} s (latency over "
            "every client's requests):\n\n"
            "| workers | clients | ideal req/s | closed loop req/s | of ideal | open p50 ms | open p99 ms | "
            "open device batch (shared by clients) | CPU ms per 1,000 requests: clients / workers / scheduler | "
            "cores busy |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"- Throughput: {min(c['of_ideal'] for c in combos):.0%}-{max(c['of_ideal'] for c in combos):.0%} of the "
            f"ideal everywhere; the package's CPU per request stays at "
            f"{min(sum(c['cpu_ms_per_1000'].values()) for c in combos):.0f}-"
            f"{max(sum(c['cpu_ms_per_1000'].values()) for c in combos):.0f} us, and at 4 workers the processes keep "
            f"{max(c['cpu_cores_busy'] for c in combos):.2f} of the 2 cores busy.\n"
            f"- Latency: one client, p50 {min(c['open']['p50_ms'] for c in one):.0f}-"
            f"{max(c['open']['p50_ms'] for c in one):.0f} / p99 {min(c['open']['p99_ms'] for c in one):.0f}-"
            f"{max(c['open']['p99_ms'] for c in one):.0f} ms; two or four clients, p50 "
            f"{min(c['open']['p50_ms'] for c in more):.0f}-{max(c['open']['p50_ms'] for c in more):.0f} / p99 "
            f"{min(c['open']['p99_ms'] for c in more):.0f}-{max(c['open']['p99_ms'] for c in more):.0f} ms, "
            "whatever the workers: a shipment waits on the worker beyond the device thread and the model a median "
            f"{max(on_worker(c) for c in one):.0f} ms or less with one client, "
            f"{min(on_worker(c) for c in more):.0f}-{max(on_worker(c) for c in more):.0f} ms (about one device "
            "batch) with more.\n"
            f"\n![cost of growth]({link('benchmarks/results/growth_case.png')})\n")


def tight_target_section() -> str:
    """The CPU case with latency_target=10ms: open loop at 70 % of the closed loop under it (``tight_target_case.json``)."""
    r = load_result("tight_target_case")
    if r is None:
        return ""
    m, t = r["machine"], r["latency_target_ms"]

    def loop(runs):
        return ", ".join(f"{o['load']:.0%} ({o['offered_rate']:,.0f}/s): p50 {o['p50_ms']:,.0f} / p99 {o['p99_ms']:,.0f} ms "
                         f"(device batches of {o['device_batch']['mean']:.1f})" for o in runs)

    t70 = next(o for o in r["tight"] if o["load"] == 0.7)
    return (f"**Tight latency target** (`tight_target_case.json`, `python benchmarks/tight_target_case.py`; "
            f"{stamp(m)}): the CPU case's CNN, 1 worker "
            f"x 1 thread, `latency_target=\"{t:.0f}ms\"`, other settings at their defaults. Closed loop under it: "
            + ", ".join(f"{p['throughput']:,.0f}" for p in r["closed_loop"])
            + " images/s (device batches of " + ", ".join(f"{p['device_batch']['mean']:.0f}" for p in r["closed_loop"])
            + f"), mean {r['capacity']:,.0f}. Open loop: {loop(r['tight'])}; p99 at 70 % within 2x the target: "
            f"{met(r['target_met'])} (delivered {t70['achieved_rate']:,.0f} of {t70['offered_rate']:,.0f}/s; median "
            f"round trip {t70['round_trip_s']['p50_ms']:.0f} ms for {t70['compute_s']['p50_ms']:.0f} ms of compute). "
            f"The same rates under the default {r['default_latency_target_ms']:.0f} ms target: {loop(r['default'])}. "
            "`docs/decisions.md` has where the time goes.\n"
            f"\n![tight latency target]({link('benchmarks/results/tight_target_case.png')})\n")


def launch_bound_section() -> str:
    """The open loop on a model imitating a launch-bound GPU host (``launch_bound_case.json``)."""
    r = load_result("launch_bound_case")
    if r is None:
        return ""
    m = r["machine"]
    rounds = "; ".join(", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} / p99 {o['p99_ms']:.0f} ms "
                                 f"(batches of {o['mean_batch']:.0f})" for o in rnd["open_loop"])
                       for rnd in r["rounds"])
    others = []
    for name, what in (("launch_bound_case_previous_62afcda", "the code before the rebuild"),
                       ("launch_bound_case_hold_3cda1b6", "partial batches held until the running one's expected end")):
        x = load_result(f"earlier/{name}")
        if x is not None:
            others.append(f"`earlier/{name}.json` ({what}): p99 at 70 % "
                          + ", ".join(f"{p:.0f}" for p in x["p99_at_70_ms"]) + " ms")
    return (f"**Launch-bound open loop** (`launch_bound_case.json`, `python benchmarks/launch_bound_case.py`; "
            f"{stamp(m)}): a model that holds the GIL "
            f"{r['spin'] * 1e3:.0f} ms per batch and sleeps {r['per_row'] * 1e6:.0f} us per row, as ResNet-50 on a slow GPU "
            f"host; per round, 30 % and 70 % of the closed loop's rate: {rounds}; p99 at 70 % within 2x the "
            f"{r['latency_target_ms']:.0f} ms target: {met(r['target_met'])}."
            + (" The same run, in the same sitting, under other code: " + "; ".join(others) + "." if others else "")
            + "\n")


def text_section() -> str:
    """Variable-length text: a tiny BERT against hand-written loops (``text_case.json``)."""
    r = load_result("text_case")
    if r is None:
        return ""
    m, t, w = r["machine"], r["throughput"], r["padding_waste"]
    loops = ", ".join(f"{k} {v:,.0f}" for k, v in t.items() if k != "dynbatch")
    return (f"**Variable-length text** (`text_case.json`, `python benchmarks/text_case.py`; {stamp(m)}): tiny BERT (2 layers, hidden 128), "
            f"{r['requests']:,} requests of {r['lengths']['min']}-{r['lengths']['max']} tokens (median "
            f"{r['lengths']['median']:.0f}), one worker process, medians of the rounds: dask-dynbatch with `pad_value=0` "
            f"and default settings {t['dynbatch']:,.0f} requests/s; by hand (batch size after the name) {loops}. "
            f"**{r['ratio_to_sorted']:.2f}x** the best sorted-and-padded loop (target 0.9: "
            f"{met(r['ratio_to_sorted'] >= 0.9)}), **{r['ratio_to_padmax']:.2f}x** the best pad-to-max loop (target 1.5: "
            f"{met(r['ratio_to_padmax'] >= 1.5)}); padding waste {w['dynbatch']:.1%} (best sorted loop "
            f"{w[r['best_sorted']]:.1%}), device batches of {r['dynbatch_mean_device_batch']:.0f} rows on average.\n")


def text_compiled_section() -> str:
    """The same text case with ``compile=True`` beside it (``text_case_compiled.json``)."""
    r = load_result("text_case_compiled")
    if r is None or "compiled" not in r["throughput"]:
        return ""
    m, t, c = r["machine"], r["throughput"], r["compiled"]["compile"]
    warm = r["compile_warm"]
    return (f"**Variable-length text, compiled** (`text_case_compiled.json`, `python benchmarks/text_case.py --compile`; "
            f"{stamp(m)}): the same case with `compile=True` beside it, after {warm['seconds']:.0f} s of untimed passes "
            f"({len(c['ready'])} (rows, length) buckets compiled of {len(c['buckets'])} asked for): compiled "
            f"{t['compiled']:,.0f} requests/s, eager {t['dynbatch']:,.0f} (**{r['compiled_ratio_to_dynbatch']:.2f}x**), "
            f"best sorted loop {t[r['best_sorted']]:,.0f} ({r['compiled_ratio_to_sorted']:.2f}x); "
            f"{c['compiled_batches']:,} of {c['compiled_batches'] + c['eager_batches']:,} batches ran compiled "
            f"(warm-up included).\n")


def collection_section() -> str:
    """Batcher.predict over a dask array, against map_blocks, the client and Ray Data (``collection_case.json``)."""
    r = load_result("collection_case")
    if r is None:
        return ""
    m, t = r["machine"], r["throughput"]
    ray = f"Ray Data `map_batches` (actor pool of 1, batches of 512) {t['ray_data']:,.0f}" if "ray_data" in t else (
        "Ray Data not run")
    ratios = "; ".join(f"`{k}` {v:.2f}x the best `map_blocks` ({r['best_map_blocks']}, target 1.1: {met(v >= 1.1)}) and "
                       f"{r['ratio_to_client_map'][k]:.3f}x `client_map` (target 0.9: {met(r['ratio_to_client_map'][k] >= 0.9)})"
                       for k, v in r["ratio_to_map_blocks"].items())
    clocks = r.get("worker_seconds")
    profiler = "" if not clocks else (
        " The worker's statistical profiler, on its event loop, per pass (median): "
        + ", ".join(f"{k} {1e3 * statistics.median(c['profile_s'] for c in v):.0f} ms" for k, v in clocks.items()
                    if k.startswith("predict")) + "; the worker's CPU per pass: "
        + ", ".join(f"{k} {statistics.median(c['cpu_s'] for c in v):.1f} s" for k, v in clocks.items()
                    if k.startswith("predict") or k == "client_map") + ".")
    earlier = ""
    for name, what in (("collection_case_33ae29a", "after the review's fixes of the wait, before replies in parts; "
                        "Ray Data beside it"),
                       ("collection_case_fb69501", "the first with tasks waiting for the queue to run short"),
                       ("collection_case_4e69aac", "each task sending while the bytes budget allowed")):
        before = load_result(f"earlier/{name}")
        if before is not None:
            earlier += (f" `earlier/{name}.json` ({before['machine']['date']}, {what}): "
                        + ", ".join(f"`{k}` {v:.3f}x `client_map`" for k, v in before["ratio_to_client_map"].items()) + ".")
    return (f"**Dask collections** (`collection_case.json`, `python benchmarks/collection_case.py`; {stamp(m)}): {r['images']:,} CNN images in a dask array "
            f"persisted on one worker (1 thread), images/s, medians of the rounds: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in t.items() if k != "ray_data") + f"; {ray}. {ratios}.{profiler}{earlier}\n")


def gpu_check_section() -> str:
    """A short GPU run of the headline targets (``gpu_check.json``: ceiling, closed and open loop)."""
    r = load_result("gpu_check")
    if r is None:
        return ""
    m, dy = r["machine"], r["dynbatch"]
    loops = ", ".join(f"{o['load']:.0%}: p50 {o['p50_ms']:.0f} / p99 {o['p99_ms']:.0f} ms" for o in r["open_loop"])
    p99 = p99_at_70(r)
    first = [h for h in dy["history"] if h[0] >= dy["timed_started"]][:3]
    stack = ", ".join(f"{h[11] * 1e3:.0f}" for h in first)
    return (f"**GPU check** (`gpu_check.json`, `python benchmarks/gpu_case.py --sections raw,dynbatch,open`; {stamp(m)}): ceiling {r['ceiling']:,.0f} images/s (raw loop at batch 1: "
            f"{r['raw']['1']:,.0f}/s); default settings, closed loop of {dy['requests']:,}: {dy['throughput']:,.0f} "
            f"(**{dy['ratio_to_ceiling']:.1%}** of the ceiling, target 95 %: {met(dy['ratio_to_ceiling'] >= 0.95)}; the "
            f"first three shipments of the timed pass took {stack} ms to stack, the later ones ~15 ms); open loop "
            f"({r['latency_target_ms']:.0f} ms target): {loops} (p99 at 70 % within 2x the target: "
            f"{met(p99 is not None and p99 <= 2 * r['latency_target_ms'])}).\n")


def gpu_compiled_section() -> str:
    """compile=True against the compiled and eager ceilings (``gpu_case_compiled.json``)."""
    r = load_result("gpu_case_compiled")
    if r is None or not r.get("compiled"):
        return ""
    m, c = r["machine"], r["compiled"]
    ceiling = r["compiled_ceiling"]
    return (f"**compile=True** (`gpu_case_compiled.json`, `gpu_case.py --sections raw,rawcompiled,compiled`; "
            f"{stamp(m)}): compiled ceiling {ceiling:,.0f} images/s "
            f"(eager {r['ceiling']:,.0f}); dask-dynbatch with `compile=True`, closed loop of {c['requests']:,} after its "
            f"buckets compiled: {c['throughput']:,.0f} (**{c['ratio_to_compiled_ceiling']:.1%}** of the compiled "
            f"ceiling, target 95 %: {met(c['ratio_to_compiled_ceiling'] >= 0.95)}; {c['ratio_to_eager_ceiling']:.2f}x "
            f"the eager one, target 1.7: {met(c['ratio_to_eager_ceiling'] >= 1.7)}).\n")


def cpu_budget_section() -> str:
    """Where the CPU case's cores go (``cpu_budget.json``)."""
    r = load_result("cpu_budget")
    if r is None:
        return ""
    m = r["machine"]
    beside = {}
    for row in r["raw_beside"]:
        beside.setdefault(row["burners"], []).append(max(row["throughput"].values()))
    raw = ", ".join((f"beside {k} busy process{'es' if k != 1 else ''}" if k else "alone") + f" {np.mean(v):,.0f}"
                    for k, v in sorted(beside.items()))

    def mean(name: str, key: str) -> float:
        return float(np.mean([p[key] for p in r["budget"][name]]))

    runs = "; ".join(
        f"{name}: {mean(name, 'throughput'):,.0f} images/s at batches of {mean(name, 'mean_device_batch'):.0f}, the device "
        f"busy {mean(name, 'device_s') / mean(name, 'wall_s'):.0%} of the pass, CPU seconds per pass: client "
        f"{mean(name, 'client_cpu_s'):.2f}, worker event loop {mean(name, 'worker_loop_thread_cpu_s'):.2f}, device "
        f"thread {mean(name, 'worker_device_thread_cpu_s'):.2f} (wall {mean(name, 'wall_s'):.2f})"
        for name in r["budget"])
    out = (f"**Where the CPU case's cores go** (`cpu_budget.json`, `python benchmarks/cpu_budget.py`; {stamp(m)}): the raw loop's best batch "
           f"{raw} images/s (means of the rounds); closed loops of {r['requests']:,} images, means of 3 passes: {runs}.")
    inputs = load_result("cpu_budget_inputs")
    if inputs is not None:
        rounds = inputs["raw_inputs"]
        sizes = list(rounds[0]["same"])
        cells = "; ".join(
            f"{n} rows: " + ", ".join(f"{kind.replace('_', ' ')} {np.mean([x[kind][n] for x in rounds]):,.0f}"
                                      for kind in ("same", "fresh_view", "fresh_copy"))
            for n in sizes)
        out += (f" The raw loop on the batch it was given, called again and again, against a fresh batch each call "
                f"(`cpu_budget_inputs.json`, `--sections raw_inputs`; {stamp(inputs['machine'])}; images/s, means of "
                f"{len(rounds)} rounds): {cells}.")
    return out + "\n"


def busy(t: dict) -> str:
    """The GPU's busy share between a timed pass's first and last forward, and how much of the pass that span was."""
    return (f"the GPU busy {t['busy_share']:.0%} from its first batch to its last ({t['span_s']:.2f} s of the "
            f"{t['pass_s']:.2f} s pass)")


def gpu_text_section() -> str:
    """Variable-length text on a GPU against sorted-bucket loops (``gpu_text_case.json``)."""
    r = load_result("gpu_text_case")
    if r is None or "dynbatch" not in r:
        return ""
    m, d = r["machine"], r["dynbatch"]
    best = r["sorted"][str(r["best_sorted_budget"])]
    text = (f"**Variable-length text on a GPU** (`gpu_text_case.json`, `python benchmarks/gpu_text_case.py`; {stamp(m)}): a 12-layer, width-768 encoder in fp16, {r['requests']:,} requests of "
            f"log-normal lengths (median {r['lengths']['median']:.0f}, at most {r['lengths']['max']}); the best sorted-bucket "
            f"loop in the worker with its input on the GPU {best['throughput']:,.0f} requests/s (budget "
            f"{r['best_sorted_budget']:,} tokens, padding {best['padding_waste']:.1%}); dask-dynbatch with `pad_value=0`, "
            f"per-token outputs back to the client {d['throughput']:,.0f} (**{r['ratio_to_sorted']:.2f}x**, target 0.9: "
            f"{met(r['ratio_to_sorted'] >= 0.9)}), padding {d['padding_waste']:.1%} (target 15 %: "
            f"{met(d['padding_waste'] <= 0.15)})")
    if d.get("timeline"):
        text += ", " + busy(d["timeline"])
    if d.get("answered_early") is not None:
        text += f", {d['answered_early']:.0%} of results answered in a part before the rest of their shipment ran"
    whole = r.get("dynbatch_whole_replies")
    if whole:
        text += (f"; with `replies-in-parts` off (each shipment answered once its last row ran) "
                 f"{whole['throughput']:,.0f} ({r['whole_replies_ratio_to_sorted']:.2f}x)")
        if whole.get("timeline"):
            text += ", " + busy(whole["timeline"])
    shm = r.get("dynbatch_shm_replies")
    if shm:
        text += (f"; the same with replies through shared memory {shm['throughput']:,.0f} "
                 f"({r['shm_replies_ratio_to_sorted']:.2f}x; untimed passes "
                 + ", ".join(f"{x:,.0f}" for x in shm["untimed"]) + ")")
        if shm.get("timeline"):
            text += ", " + busy(shm["timeline"])
    checks = [v["verify"] for v in (d, shm, r.get("dynbatch_pooled")) if v and v.get("verify")]
    if checks:
        text += (f"; {sum(c['requests'] for c in checks):,} outputs compared with each request run alone: largest "
                 f"difference {max(c['max_abs_diff'] for c in checks):.4f} (fp16), {sum(c['over_0.1'] for c in checks)} over 0.1")
    pooled = r.get("dynbatch_pooled")
    if pooled:
        text += (f"; the pooled output alone {pooled['throughput']:,.0f} (**{r['pooled_ratio_to_sorted']:.2f}x**, "
                 f"target 0.9: {met(r['pooled_ratio_to_sorted'] >= 0.9)}), padding {pooled['padding_waste']:.1%}")
        timeline = pooled.get("timeline")
        if timeline:
            text += f", {busy(timeline)}, in batches of a median {timeline['median_tokens']:,.0f} tokens"
    pressure = r.get("pressure") or {}
    if "dynbatch" in pressure:
        dp = pressure["dynbatch"]
        fixed = pressure.get("padmax") or {}
        rows = ", ".join(f"{k} rows {v['failed']:,} of {v['requests']:,} failed" for k, v in fixed.items()
                         if isinstance(v, dict) and "failed" in v)
        text += (f". Under the memory-pressure neighbour: dask-dynbatch {dp['failed']:,} of {dp['requests']:,} failed; "
                 f"fixed pad-to-max batches of {rows}")
    return text + ".\n"


def standin_section() -> str:
    """The GPU text case's traffic on a CPU stand-in, with and without replies in parts (``text_standin.json``)."""
    r = load_result("text_standin")
    if r is None:
        return ""
    m, t = r["machine"], r["throughput"]

    def passes(name: str) -> str:
        out = []
        for line in r["timelines"][name]:
            parts = line.get("padding_by_part")
            split = "" if not parts else (f" ({parts['first_fifth']:.0%} in the first fifth, {parts['middle']:.0%} between, "
                                          f"{parts['last_tenth']:.0%} in the last tenth)")
            out.append(f"{line['batches']} batches, busy {line['busy_share']:.0%}, padding {line['padding']:.0%}{split}")
        return "; ".join(out)

    return (f"**Text traffic on a CPU stand-in** (`text_standin.json`, `python benchmarks/text_standin.py`; {stamp(m)}): "
            f"the GPU text case's {r['requests']:,} lengths through a padded model that sleeps "
            f"{r['model']['seconds_per_token'] * 1e6:.1f} us a padded token and {r['model']['seconds_per_batch'] * 1e3:.1f} ms a "
            f"batch, per-token outputs of width {r['width']}; requests/s (medians): sorted loop in the worker {t['sorted']:,.0f}, "
            f"dask-dynbatch with replies in parts {t['parts']:,.0f} (**{r['ratio_to_sorted']['parts']:.2f}x**), whole replies "
            f"{t['whole']:,.0f} ({r['ratio_to_sorted']['whole']:.2f}x). Per pass, replies in parts: {passes('parts')}. "
            f"Whole replies: {passes('whole')}.\n")


def shared_device_section() -> str:
    """Three models flooded on one device thread, alone and together (``shared_device_case.json``)."""
    r = load_result("shared_device_case")
    if r is None:
        return ""
    m, setup = r["machine"], r["setup"]

    def rounds(result: dict) -> str:
        return "; ".join(f"{x['rows_per_s']:,.0f} rows/s at batches of "
                         + "/".join(f"{v:,.0f}" for v in x["mean_batch"].values()) for x in result["together"])

    alone = r["alone"]
    out = (f"**Several models on one device** (`shared_device_case.json`, `python benchmarks/shared_device_case.py`; "
           f"{stamp(m)}): three models that sleep {setup['overhead_s'] * 1e3:.0f} ms + {setup['per_row_s'] * 1e6:.0f} us a row "
           f"on one worker, default settings, {setup['rows']:,} rows each. Alone "
           + ", ".join(f"{v['rows_per_s']:,.0f}" for v in alone.values())
           + f" rows/s at batches of {np.mean([v['mean_batch'] for v in alone.values()]):,.0f}; all three at once "
           f"{rounds(r)}: **{r['ratio_together_to_alone']:.2f}x** alone.")

    def open_runs(result: dict) -> str:
        return "; ".join(
            f"{run['load']:.0%} ({run['rate_per_model']:,.0f}/s each): p50/p99 "
            + ", ".join(f"{model['p50_ms']:.0f}/{model['p99_ms']:.0f} ms" for model in run["models"].values())
            + f" at batches of {np.mean([model['mean_batch'] for model in run['models'].values()]):,.0f}"
            for run in result.get("open", []))

    if r.get("open"):
        out += f" Poisson arrivals for all three, as fractions of the rate alone: {open_runs(r)} (latency target 100 ms)."
    before = load_result("earlier/shared_device_case_f96cd16")
    if before is not None:
        out += (f" The code before (`earlier/shared_device_case_f96cd16.json`, each model's batch time counted from its "
                f"own previous batch): {rounds(before)}: {before['ratio_together_to_alone']:.2f}x"
                + (f"; open loop {open_runs(before)}" if before.get("open") else "") + ".")
    return out + "\n"


def padding_sim_section() -> str:
    """Padding of the server's batches by budget, without a device (``padding_sim.json``)."""
    r = load_result("padding_sim")
    if r is None:
        return ""
    parts = "; ".join(f"{int(b):,} tokens: {v['default']['padding']:.1%} (8,192-row window {v['fixed_window']['padding']:.1%}, "
                      f"sorted loop {v['sorted']['padding']:.1%})" for b, v in r["budgets"].items())
    return (f"**Padding by batch budget** (`padding_sim.json`, `python benchmarks/padding_sim.py`; {stamp(r['machine'])}): "
            f"the GPU text case's {r['requests']:,} lengths queued at once and taken batch by batch: {parts}.\n")


def gpu_collection_section() -> str:
    """predict over a dask array on a GPU worker (``gpu_collection_case.json``)."""
    r = load_result("gpu_collection_case")
    if r is None or "throughput" not in r:
        return ""
    m, t = r["machine"], r["throughput"]
    text = (f"**Dask collections on a GPU** (`gpu_collection_case.json`, `python benchmarks/gpu_collection_case.py`; "
            f"{stamp(m)}): {r['rows']:,} ResNet-50 images made by CPU workers "
            f"of the same host, the model on the GPU worker, images/s: ceiling {r.get('ceiling', 0):,.0f}; "
            + ", ".join(f"{k} {v:,.0f}" for k, v in t.items()))
    if r.get("ratio_to_ceiling") is not None:
        text += f"; `predict` {r['ratio_to_ceiling']:.1%} of the ceiling (target 90 %: {met(r['ratio_to_ceiling'] >= 0.9)})"
    if r.get("ratio_to_map_blocks") is not None:
        text += (f", {r['ratio_to_map_blocks']:.2f}x the best `map_blocks` (target 1.0: "
                 f"{met(r['ratio_to_map_blocks'] >= 1.0)})")
    elif "map_blocks" in (r.get("errors") or {}):
        text += ", `map_blocks` not measured (its section failed: " + r["errors"]["map_blocks"].strip().splitlines()[-1][:80] + ")"
    pressure = r.get("pressure") or {}
    if isinstance(pressure.get("predict"), dict):
        p = pressure["predict"]
        text += f". Under the memory-pressure neighbour: `predict` {p.get('failed_rows')} of {p.get('rows')} rows failed"
        for k, v in pressure.items():
            if k != "predict" and isinstance(v, dict) and "failed_blocks" in v:
                text += f"; `{k}` {v['failed_blocks']} of {v.get('blocks')} blocks failed"
    return text + ".\n"


def multi_model_section() -> str:
    """Three models sharing one memory-limited GPU (``multi_model_case.json``)."""
    r = load_result("multi_model_case")
    if r is None or "targets" not in r:
        return ""
    m, c, tg = r["machine"], r["contenders"], r["targets"]
    rows = []
    for name, entry in c.items():
        summary = entry.get("summary") or {}
        if not summary:
            continue
        phases = "; ".join(f"{ph['phase']} {ph['served_per_s']:,.0f}/s" for ph in summary["phases"])
        rows.append(f"`{name}` {summary['served_per_s']:,.0f} requests/s over the run ({phases}), "
                    f"{summary['failed']:,} failed")
    return (f"**Several models on one GPU** (`multi_model_case.json` + `.png`, `python benchmarks/multi_model_case.py`; "
            f"{stamp(m)}): a classifier, a segmenter and a ViT under a "
            f"memory limit, open-loop arrivals in phases: " + "; ".join(rows)
            + f". dask-dynbatch failed {tg.get('dynbatch_failed')} (target 0: {met(bool(tg.get('dynbatch_failed_met')))}); "
            + throughput_against(tg, (c.get("static_safe", {}).get("summary") or {}).get("failed", 0))
            + "; p99 within 2x the targets while the GPU kept up: "
            f"{met(bool(tg.get('p99_met')))}. ![multi-model](results/multi_model_case.png)\n")


def throughput_against(tg: dict, safe_failed: int) -> str:
    """The throughput target's line: against the best static contender that failed nothing, and
    whether that is the sweep's safe sizes (else the ratio tests nothing)."""
    if "throughput_baseline" not in tg:  # (a run recorded before the baseline was named)
        text = f"throughput {tg.get('throughput_ratio', 0):.2f}x the static sizes checked safe"
        if safe_failed:
            return text + (f", which failed {safe_failed:,} requests in the run: not safe, so the 1.2 target is not "
                           "tested by this run")
        return text + f" (target 1.2: {met(bool(tg.get('throughput_met')))})"
    base = tg["throughput_baseline"]
    if base is None:
        return "throughput not compared: every static contender failed requests"
    text = f"throughput {tg['throughput_ratio']:.2f}x `{base}`, the best static contender that failed nothing"
    if tg.get("throughput_valid"):
        return text + f" (target 1.2: {met(bool(tg.get('throughput_met')))})"
    return text + (f" (`static_safe` failed {tg.get('static_safe_failed', 0):,}: its sizes were not safe, so the "
                   "1.2 target is not tested by this run)")


def reply_section() -> str:
    """Per-token outputs back to a same-host client, comm or shared memory (``reply_case.json``)."""
    r = load_result("reply_case")
    if r is None:
        return ""
    m, c, cpu = r["machine"], r["contenders"], r["cpu_s"]

    def rates(name: str) -> str:
        return ", ".join(f"{v:,.0f}" for v in c[name])

    def worker_cpu(name: str) -> str:
        return ", ".join(f"{x['worker']:.1f}" for x in cpu[name])

    return (f"**Large replies** (`reply_case.json` + `.png`, `python benchmarks/reply_case.py`; {m.get('cpu')}, "
            f"{m['cpu_count']} cores, {m['date']}, commit {m.get('commit')}): a padded stand-in model (0.7 us a token) "
            f"returning per-token features of width 768 in fp16, {r['requests']:,} requests, "
            f"{r['per_token_gb']:.1f} GB of them a pass; requests/s per round: pooled row alone {rates('pooled')}; "
            f"per-token over the comm {rates('tokens_comm')}; per-token through shared memory "
            f"{rates('tokens_shm')} ({r['ratios']['tokens_shm_vs_comm']:.2f}x the comm, worker CPU seconds a pass "
            f"{worker_cpu('tokens_shm')} against {worker_cpu('tokens_comm')}). Shared-memory replies stay off by "
            f"default. ![replies](results/reply_case.png)\n")


def first_result_section() -> str:
    """Time to the first result and the front end through predict() (``first_result*.json``)."""
    parts = []
    for name in ("first_result", "first_result_gpu"):
        r = load_result(name)
        if r is None:
            continue
        m = r["machine"]
        where = m.get("gpu") or f"{m.get('cpu')}, {m['cpu_count']} cores"
        rounds = ", ".join(f"{x['first_result_s']:.2f} s (load {x['load_s']:.2f} s)" for x in r["rounds"])
        text = (f"**First result** (`{name}.json`, `python benchmarks/first_result.py`; {where}, {m['date']}): "
                f"{r['model']} on a fresh 1-worker cluster, `Batcher(...)` to the first result: {rounds}; the median "
                f"{r['median_over_load_s']:.2f} s over the model's load (target {r['target_over_load_s']:.1f} s: "
                f"{met(r['median_over_load_s'] <= r['target_over_load_s'])}).")
        fe = r.get("front_end")
        if fe:
            text += (f" Front end: `predict()` of {fe['rows']:,} rows on a no-op model, {fe['rows_per_s']:,.0f} rows/s "
                     f"(target 500,000: {met(fe['rows_per_s'] >= 500_000)}).")
        parts.append(text + "\n")
    return "\n".join(parts)


def section() -> str:
    c, g = load_result("cpu_case", required=True), load_result("gpu_case", required=True)
    p = load_result("gpu_case_pressure")
    return f"""{START}
Recorded under `benchmarks/results/` (JSON with the machine stamp, plus PNG); this section is written
by `python benchmarks/readme_results.py`. How to rerun each is above. Earlier runs are in
`benchmarks/results/earlier/` (its README says what each shows).

{cpu_section(c)}
{cpu_budget_section()}
{first_result_section()}
{text_section()}
{text_compiled_section()}
{reply_section()}
{collection_section()}
{sharing_section()}
{growth_section()}
{tight_target_section()}
{launch_bound_section()}
{placement_section()}
{pipeline_section()}
{gpu_check_section()}
{gpu_compiled_section()}
{gpu_text_section()}
{standin_section()}
{padding_sim_section()}
{shared_device_section()}
{gpu_collection_section()}
{multi_model_section()}
{gpu_section(g, p)}
{earlier_gpu_section()}
{cpu_compile_section()}
"""


def has_markers(path: Path) -> bool:
    if not path.exists():
        return False
    text = path.read_text()
    return START in text and END in text.split(START, 1)[1]


def main(argv: list[str] | None = None) -> None:
    global _LINK_BASE
    parser = argparse.ArgumentParser(description="Write the benchmark results section (see the module docstring).")
    parser.add_argument("--target", help="the Markdown file to write the section into")
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    if args.target:
        target = Path(args.target).resolve()
    else:
        target = ROOT / "benchmarks" / "README.md"
    if args.print:
        _LINK_BASE = target.parent if target is not None else ROOT
        print(section())
        return
    if target is None or not has_markers(target):
        sys.exit(f"readme_results.py: no file with the lines {START!r} and {END!r} to write between "
                 f"(in {target}); "
                 "add them, pass --target, or use --print")
    _LINK_BASE = target.parent
    text = target.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    target.write_text(before + section() + END + after)
    print(f"wrote the results section into {target}")


if __name__ == "__main__":
    main()
