"""A three-stage job chain (CPU -> model -> CPU) through ``Pipeline``, against each stage alone.

Every stage costs about 1 ms per job: NumPy work (small matmul + tanh, calibrated on a worker) for
the CPU steps. LocalCluster of 2 worker processes x 1 thread on this 2-core machine. Three setups:

``shared``
    The literal case: the model step is the same 1 ms of NumPy per sample, and all three stages
    share the same two cores. Overlap cannot help here: the pipeline needs 3 ms of CPU per job on
    2 cores while each stage alone gets both cores, so the physical bound is ~1/3 of the slowest
    stage alone. Reported as well: the ratio to "no overlap lost" (1 / sum of 1/stage rate).
``split``
    The issue's scenario, where stages use different resources: CPU pre-processing pinned to worker
    0, post-processing pinned to worker 1 (``cpu(..., workers=...)``), and the model a simulated
    accelerator (2 ms of device time per sample, a sleep: the device is busy, the host CPU is not;
    two devices -> ~1 ms per sample). Overlap is what lets the pipeline approach the slowest stage,
    but the client, scheduler and the workers' event loops need CPU from the same two cores.
``io``
    As ``split``, with CPU steps that wait 2 ms per job on I/O (a sleep) instead of computing, and
    an accelerator of 4 ms per sample (two devices -> ~2 ms per sample), so that the three stages
    cost about the same: the stages use separate resources and leave the CPU to orchestration, so
    this isolates how well the pipeline overlaps its stages.

Each stage alone: CPU stages as plain Dask with hand-chunked tasks of 64 jobs (the best a user does
by hand, same placement; the pre step also through a one-step Pipeline); the model stage through
its Batcher. Contenders run in interleaved rounds and medians are reported, because this 2-core
machine is shared with other work (the load average is recorded); so is the CPU time each process
spent per job, which load from elsewhere does not change.
Priority: a backlog of low-priority jobs queued at once (``--backlog-seconds`` of work at the
pipeline's measured rate), then 10 high-priority jobs every 100 ms for 2.5 s; median latency
(submit -> result) of each class.

    python benchmarks/pipeline_case.py          # writes benchmarks/results/pipeline_case.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

SIDE = 32  # a job's value: SIDE x SIDE float32
SETUPS = {
    "shared": "all three stages are ~1 ms of NumPy per job on the same 2 cores (CPU model)",
    "split": "pre ~1 ms NumPy on worker 0, post ~1 ms NumPy on worker 1, model a simulated accelerator "
             "(2 ms/sample of device time, two devices)",
    "io": "pre and post wait 2 ms per job on I/O (sleep; pinned to worker 0 / worker 1), model a simulated "
          "accelerator (4 ms/sample, two devices): stages of about equal cost on separate resources, CPU left "
          "for orchestration",
}
STAGE_SECONDS = 1e-3  # target cost of each stage per job


# -- stage work ----------------------------------------------------------------------------------
def work(x: np.ndarray, reps: int) -> np.ndarray:
    """~1 ms of NumPy on one job's value (same shape out)."""
    w = np.full((x.shape[-1], x.shape[-1]), 1.0 / x.shape[-1], dtype=np.float32)
    for _ in range(reps):
        x = np.tanh(x @ w + 0.5)
    return x


def calibrate() -> int:
    """Repetitions of ``work``'s loop for STAGE_SECONDS, measured where it runs (a worker). The
    fastest of many trials: on a shared machine, slower trials measure someone else's load."""
    x = np.ones((SIDE, SIDE), dtype=np.float32)
    trial_reps = 20
    per_rep = []
    for _ in range(50):
        t = time.perf_counter()
        work(x, trial_reps)
        per_rep.append((time.perf_counter() - t) / trial_reps)
    return max(1, round(STAGE_SECONDS / min(per_rep)))


def chunk(fn, xs: list) -> list:
    return [fn(x) for x in xs]


def build_cpu_model(reps: int):
    def run(batch):
        return np.stack([work(x, reps) for x in batch])

    return lambda device="cpu": run


def io_step(x: np.ndarray, seconds: float) -> np.ndarray:
    """A step that waits on I/O (reading from storage, say): holds its thread, not the CPU."""
    time.sleep(seconds)
    return x + 1


def build_accelerator(seconds_per_sample: float):
    def run(batch):
        time.sleep(seconds_per_sample * len(batch))  # the device is busy; the host CPU is free
        return batch + 1

    return lambda device="cpu": run


# -- measurements --------------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds used by the client process (LocalCluster's scheduler lives there too) and each worker."""

    def __init__(self, client):
        import psutil

        self.procs = {"client+scheduler": psutil.Process()}
        for i, (_address, pid) in enumerate(sorted(client.run(os.getpid).items())):
            self.procs[f"worker{i}"] = psutil.Process(pid)

    def read(self) -> dict[str, float]:
        return {k: sum(p.cpu_times()[:2]) for k, p in self.procs.items()}


def measure(meter: CpuMeter, n: int, fn) -> dict:
    """Run ``fn()`` (which processes ``n`` jobs); jobs/s, wall seconds, CPU ms per job per process."""
    before, load = meter.read(), os.getloadavg()[0]
    started = time.perf_counter()
    fn()
    wall = time.perf_counter() - started
    after = meter.read()
    cpu = {k: (after[k] - before[k]) / n * 1e3 for k in before}
    return {"rate": n / wall, "wall_s": wall, "cpu_ms_per_job": cpu, "cpu_ms_per_job_total": sum(cpu.values()),
            "loadavg_1min_before": load}


def wait_all(futures: list) -> None:
    for f in futures:
        f.result()


def plain_dask_chunked(client, fn, xs: list, workers=None, size: int = 64) -> None:
    chunks = [xs[i : i + size] for i in range(0, len(xs), size)]
    client.gather(client.map(partial(chunk, fn), chunks, pure=False, workers=workers))


def run_setup(client, meter: CpuMeter, name: str, xs: list, step, spec: ddb.ModelSpec, pre_at, post_at,
              rounds: int, backlog_seconds: float) -> dict:
    out: dict = {"setup": name, "description": SETUPS[name]}
    batcher = ddb.Batcher(client, spec)
    pre_step = ddb.cpu(step, name="pre", workers=pre_at)
    post_step = ddb.cpu(step, name="post", workers=post_at)
    pipe = ddb.Pipeline(client, [pre_step, ddb.model(batcher), post_step])
    pre_alone = ddb.Pipeline(client, [pre_step])
    wait_all(pipe.map(xs[:300]))  # warm up: model loaded, code paths hot
    contenders = {
        "pre": lambda: plain_dask_chunked(client, step, xs, pre_at),
        "model": lambda: wait_all(batcher.map(xs)),
        "post": lambda: plain_dask_chunked(client, step, xs, post_at),
        "pre_via_pipeline": lambda: wait_all(pre_alone.map(xs)),
        "pipeline": lambda: wait_all(pipe.map(xs)),
    }
    samples: dict[str, list[dict]] = {k: [] for k in contenders}
    for r in range(rounds):  # interleaved, so that load from elsewhere hits every contender alike
        for key, fn in contenders.items():
            samples[key].append(measure(meter, len(xs), fn))
        print(f"[{name}] round {r}: " + ", ".join(f"{k} {v[-1]['rate']:.0f}/s" for k, v in samples.items()), flush=True)
    median = {k: float(np.median([m["rate"] for m in v])) for k, v in samples.items()}
    cpu = {k: float(np.median([m["cpu_ms_per_job_total"] for m in v])) for k, v in samples.items()}
    slowest = min(median["pre"], median["model"], median["post"])
    no_overlap = 1.0 / (1.0 / median["pre"] + 1.0 / median["model"] + 1.0 / median["post"])
    out["samples"] = samples
    out["median_rate"] = median
    out["median_cpu_ms_per_job"] = cpu
    out["pipeline_stages"] = pipe.stats()["stages"]
    out["ratios"] = {
        "pipeline_vs_slowest_stage_alone": median["pipeline"] / slowest,
        "pipeline_vs_sum_of_stages": median["pipeline"] / no_overlap,
        "pipeline_cpu_vs_sum_of_stages_cpu": cpu["pipeline"] / (cpu["pre"] + cpu["model"] + cpu["post"]),
    }
    print(f"[{name}] medians: " + ", ".join(f"{k} {v:.0f}/s" for k, v in median.items()), flush=True)
    print(f"[{name}] CPU ms/job: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
    print(f"[{name}] ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in out["ratios"].items()), flush=True)
    n_low = int(min(6000, max(500, median["pipeline"] * backlog_seconds)))
    out["priority"] = priority_under_backlog(pipe, xs, n_low)
    print(f"[{name}] priority: {out['priority']}", flush=True)
    batcher.close()
    return out


def priority_under_backlog(pipe: ddb.Pipeline, xs: list, n_low: int, rounds: int = 25, per_round: int = 10) -> dict:
    """``n_low`` priority-0 jobs at once, then ``per_round`` priority-10 jobs every 100 ms."""
    latency: dict[str, list[float]] = {"low": [], "high": []}
    lock = threading.Lock()

    def track(futures, kind):
        t0 = time.perf_counter()

        def record(_, t0=t0):
            with lock:
                latency[kind].append(time.perf_counter() - t0)

        for f in futures:
            f.add_done_callback(record)
        return futures

    started = time.perf_counter()
    lows = track(pipe.map([xs[i % len(xs)] for i in range(n_low)], priority=0), "low")
    highs = []
    time.sleep(0.3)
    for r in range(rounds):
        highs += track(pipe.map(xs[r * per_round : (r + 1) * per_round], priority=10), "high")
        time.sleep(0.1)
    wait_all(lows + highs)
    low, high = np.array(latency["low"]), np.array(latency["high"])
    return {
        "low_jobs": len(low),
        "high_jobs": len(high),
        "low_median_ms": float(np.median(low) * 1e3),
        "high_median_ms": float(np.median(high) * 1e3),
        "low_p90_ms": float(np.percentile(low, 90) * 1e3),
        "high_p90_ms": float(np.percentile(high, 90) * 1e3),
        "high_over_low_median": float(np.median(high) / np.median(low)),
        "backlog_drained_s": time.perf_counter() - started,
    }


def main(argv=None) -> dict:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every contender")
    parser.add_argument("--backlog-seconds", type=float, default=4.0,
                        help="low-priority backlog, in seconds of work at the pipeline's measured rate")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma separated, of {', '.join(SETUPS)}")
    parser.add_argument("--name", default=None, help="result file name (default pipeline_case[_quick])")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG")
    args = parser.parse_args(argv)
    setups = args.setups.split(",")
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose from {list(SETUPS)}")
    if args.quick:
        args.jobs, args.rounds, args.backlog_seconds = 400, 1, 1.5
    rng = np.random.default_rng(0)
    xs = list(rng.standard_normal((args.jobs, SIDE, SIDE)).astype(np.float32))
    result: dict = {"machine": machine_stamp(), "jobs": args.jobs, "rounds": args.rounds, "backlog_seconds": args.backlog_seconds,
                    "stage_seconds_target": STAGE_SECONDS, "loadavg_at_start": os.getloadavg()}
    started = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        workers = sorted(client.nthreads())
        meter = CpuMeter(client)
        reps = int(np.mean(list(client.run(calibrate).values())))
        step = partial(work, reps=reps)
        measured = client.submit(lambda: min(_time(step) for _ in range(20)), pure=False).result()
        result["calibration"] = {"reps": reps, "cpu_step_ms_on_worker": measured * 1e3}
        print(f"calibrated: {reps} reps = {measured * 1e3:.2f} ms per job per CPU step", flush=True)

        made = {  # setup -> (step, model spec, pre placement, post placement)
            "shared": lambda: (step, ddb.ModelSpec("numpy-1ms", load=build_cpu_model(reps), max_batch_size=64),
                               None, None),
            "split": lambda: (step, ddb.ModelSpec("accelerator-2ms", load=build_accelerator(2 * STAGE_SECONDS),
                                                  max_batch_size=64), [workers[0]], [workers[1]]),
            "io": lambda: (partial(io_step, seconds=2 * STAGE_SECONDS),
                           ddb.ModelSpec("accelerator-4ms-io", load=build_accelerator(4 * STAGE_SECONDS), max_batch_size=64),
                           [workers[0]], [workers[1]]),
        }
        for setup in setups:
            setup_step, spec, pre_at, post_at = made[setup]()
            result[setup] = run_setup(client, meter, setup, xs, setup_step, spec, pre_at, post_at, args.rounds,
                                      args.backlog_seconds)
    result["seconds"] = time.perf_counter() - started
    result["loadavg_at_end"] = os.getloadavg()
    name = args.name or ("pipeline_case_quick" if args.quick else "pipeline_case")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    plot(result, out / f"{name}.png")
    print(f"wrote {out / name}.json/.png in {result['seconds']:.0f}s; load average {result['loadavg_at_end']}", flush=True)
    return result


def _time(fn) -> float:
    x = np.ones((SIDE, SIDE), dtype=np.float32)
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    labels = ["pre alone", "model alone", "post alone", "pipeline"]
    width = 0.38
    setups = [k for k in SETUPS if k in result]
    width = 0.8 / len(setups)
    for k, setup in enumerate(setups):
        r = result[setup]
        m = r["median_rate"]
        values = [m["pre"], m["model"], m["post"], m["pipeline"]]
        xpos = np.arange(4) + (k - (len(setups) - 1) / 2) * width
        ax.bar(xpos, values, width, label=f"{setup}: pipeline = {r['ratios']['pipeline_vs_slowest_stage_alone']:.2f}x slowest")
        slowest = min(values[:3])
        ax.hlines(0.8 * slowest, xpos[3] - width / 2, xpos[3] + width / 2, colors="k", linestyles="--")
    ax.set_xticks(np.arange(4), labels)
    ax.set_ylabel("jobs/s")
    ax.set_title(f"Throughput, median of {result['rounds']} interleaved rounds (dashed: 0.8 x slowest alone)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    for k, setup in enumerate(setups):
        s = result[setup]["priority"]
        xpos = np.array([0, 1]) + (k - (len(setups) - 1) / 2) * width
        ax.bar(xpos, [s["high_median_ms"], s["low_median_ms"]], width,
               label=f"{setup}: high/low median = {s['high_over_low_median']:.3f}")
        ax.errorbar(xpos, [s["high_median_ms"], s["low_median_ms"]],
                    yerr=[[0, 0], [s["high_p90_ms"] - s["high_median_ms"], s["low_p90_ms"] - s["low_median_ms"]]],
                    fmt="none", ecolor="k", capsize=3)
    ax.set_xticks([0, 1], ["priority 10", "priority 0"])
    ax.set_ylabel("latency, ms (median, bar to p90)")
    ax.set_title("Latency under a backlog")
    ax.legend(fontsize=8)

    ax = axes[2]  # CPU time per job: what load from elsewhere on the machine does not change
    names = ["pre", "model", "post", "pipeline"]
    for k, setup in enumerate(setups):
        samples = result[setup]["samples"]
        procs = list(samples["pipeline"][0]["cpu_ms_per_job"])
        bottom = np.zeros(len(names))
        xpos = np.arange(len(names)) + (k - (len(setups) - 1) / 2) * width
        for j, proc in enumerate(procs):
            values = np.array([np.median([m["cpu_ms_per_job"][proc] for m in samples[n]]) for n in names])
            ax.bar(xpos, values, width, bottom=bottom, color=plt.cm.tab20c(4 * j + k),
                   label=f"{setup}: {proc}", edgecolor="white", linewidth=0.5)
            bottom += values
    ax.set_xticks(np.arange(len(names)), [f"{n} alone" if n != "pipeline" else n for n in names])
    ax.set_ylabel("CPU ms per job, all processes")
    ax.set_title("CPU time per job, bars in order: " + ", ".join(setups), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    stamp = result["machine"]
    fig.suptitle(f"Pipeline cpu -> model -> cpu, {result['jobs']} jobs, ~1 ms/stage; {stamp.get('cpu')} x{stamp.get('cpu_count')}; "
                 f"load average {result['loadavg_at_start'][0]:.1f} at start", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
