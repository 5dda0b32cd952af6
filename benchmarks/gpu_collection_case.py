"""Inference over a dask array made on CPU workers and predicted on a GPU worker of the same host
(targets: ``Batcher.predict`` >= 90 % of the eager ceiling and >= the best hand-written
``map_blocks``; under the memory-pressure neighbour, 0 failed rows while ``map_blocks`` with large
chunks fails).

One cluster on the host (``SpecCluster``): ``--cpu-workers`` CPU worker processes
(``CUDA_VISIBLE_DEVICES`` empty) and one GPU worker started with ``resources={"GPU": 1}``.
ResNet-50 fp16 channels-last (``dask_dynbatch.examples.build_resnet50``). The images (224x224x3
uint8, 200,000 by default) are never persisted: each block is drawn from a seeded generator per
group of rows (the same rows whatever the chunking) in tasks restricted to the CPU workers
(``dask.annotate(workers=...)``), so making them costs CPU time on those workers, as reading and
decoding would. Dask's low-level task fusion is off for every contender
(``optimization.fuse.active: False``): it drops the layers' annotations. Contenders, in this
order, each timed once:

``raw``            the eager ceiling: ``baselines.raw_loop`` in the GPU worker, input already on the
                   GPU, batch 128..1,024, the best kept
``predict``        ``Batcher.predict(images).sum(axis=0).compute()`` on the images in blocks of
                   ``--predict-chunk`` rows, with a Batcher of default settings restricted to the GPU
                   worker (``ModelSpec(resources={"GPU": 1})``, as the README's deployment section
                   says), after an untimed pass over ``--warm-rows``; the predictions stay on the
                   cluster (the client gets the sum, 1,000 numbers)
``map_blocks_<c>`` the hand-written alternative: ``images.map_blocks(the model cached in the worker
                   process)`` under ``dask.annotate(resources={"GPU": 1})``, then the same sum; chunks
                   of 64, 512 and 4,096 rows over ``--probe-rows`` rows each, then the best of them
                   again over all the rows (``map_blocks_best``). Annotated layers are kept apart
                   (``optimization.annotations.fuse: False``): fused, the making of a block (CPU
                   workers) and the model (a GPU resource) would ask for a worker that has both
``pressure``       the neighbour of ``gpu_case.py`` (another process holding all but
                   ``--hog-keep-gib`` of the GPU's memory) takes the memory, the GPU worker is
                   restarted under it, then ``predict`` (``on_error="missing"``: failed rows are
                   counted) over all the rows, then ``map_blocks`` at ``--pressure-chunks`` over
                   ``--pressure-rows`` rows, failed blocks counted

Each contender's result is saved to ``gpu_collection_case.json`` as it finishes (the task counts
per worker and layer show where each contender's tasks ran); a bar plot goes to
``gpu_collection_case.png``.

    python benchmarks/gpu_collection_case.py --out $OUT                # on the GPU machine (~4 min)
    python benchmarks/gpu_collection_case.py --smoke --out /tmp/gcoll  # on a CPU, ~30 s: the code paths only

``--smoke``: the CPU case's tiny CNN on a few hundred 64x64 images, two CPU workers and a "GPU"
worker whose resource is only a label; a stand-in neighbour holds nothing, and blocks larger than
the smallest chunking fail in place of running out of memory; the run then checks where every
contender's tasks ran.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save, server_state, throughput_bars  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch import baselines  # noqa: E402
from dask_dynbatch.examples import build_resnet50, build_tiny_cnn  # noqa: E402

NAME = "gpu_collection_case"
#: what differs between the GPU run and the smoke run on a CPU
SIZES = {
    "full": dict(shape=(224, 224, 3), load=build_resnet50, chunks=(64, 512, 4096), raw_batches=[128, 256, 512, 1024],
                 raw_seconds=3.0, predict_chunk=512),
    "smoke": dict(shape=(64, 64, 3), load=build_tiny_cnn, chunks=(16, 64, 256), raw_batches=[16, 64], raw_seconds=0.3,
                  predict_chunk=64),
}

SMOKE_ARGS = dict(rows=768, probe_rows=512, warm_rows=256, cpu_workers=2, cpu_threads=1, gpu_threads=1,
                  pressure_chunks="256,16", pressure_rows=512)

FAKE_HOG = """
import sys
print("smoke hog holds 0 GiB (no GPU)", flush=True)
sys.stdin.readline()
print("hog releases", flush=True)
"""


def make_block(group: int, seed: int, shape: tuple, block_info: dict | None = None) -> np.ndarray:
    """Rows ``[a, b)`` of the images: each group of ``group`` rows from its own seeded generator,
    so a row is the same whatever the chunking."""
    (a, b) = block_info[None]["array-location"][0]
    out = np.empty((b - a, *shape), dtype=np.uint8)
    for g in range(a // group, math.ceil(b / group)):
        rows = np.random.default_rng([seed, g]).integers(0, 256, (group, *shape), dtype=np.uint8)
        lo, hi = max(a, g * group), min(b, (g + 1) * group)
        out[lo - a: hi - a] = rows[lo - g * group: hi - g * group]
    return out


def images(n: int, chunk: int, shape: tuple, group: int, cpu_workers: list[str], seed: int = 0):
    """A lazy dask array of ``n`` images in blocks of ``chunk`` rows, made on the CPU workers."""
    import dask
    import dask.array as da
    from dask.base import tokenize

    chunks = ((chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ()), *((s,) for s in shape))
    with dask.annotate(workers=cpu_workers):
        return da.map_blocks(make_block, group, seed, shape, dtype=np.uint8, chunks=chunks,
                             name=f"images-{tokenize(n, chunk, shape, group, seed)}")


def cached_model_block(block: np.ndarray, load, fail_over: int | None = None) -> np.ndarray:
    """The hand-written contender: the model cached in the worker process, run on the whole block.
    ``fail_over`` (smoke runs only, where no GPU can run out of memory) fails blocks of more rows."""
    if fail_over is not None and len(block) > fail_over:
        raise MemoryError(f"smoke run: a block of {len(block)} rows stands in for a CUDA out-of-memory error")
    return baselines.predict_chunk(load, block)


def by_blocks(x, load, classes: int, fail_over: int | None = None):
    """``x.map_blocks`` of the cached model, its tasks restricted to the GPU worker."""
    import dask
    from dask.base import tokenize

    with dask.annotate(resources={"GPU": 1}):
        return x.map_blocks(cached_model_block, load, fail_over, dtype=np.float16, chunks=(x.chunks[0], (classes,)),
                            drop_axis=[2, 3], name=f"model-blocks-{tokenize(x.name, load, fail_over)}")


def unfused():
    """Where the hand-written contender is computed: the images' tasks are restricted to the CPU
    workers and the model's to the GPU worker, and fused into one task they would ask for a worker
    that is both (Dask merges the annotations of the layers it fuses)."""
    import dask

    return dask.config.set({"optimization.annotations.fuse": False})


def served(client, model: str, names: dict[str, str]) -> dict:
    """What the model servers of ``model`` did so far, per worker name (only the GPU worker should
    have one): batches, rows, device seconds, OOMs, the controller's state."""
    out = {}
    for address, state in server_state(client, model).items():
        controller = state.get("controller") or {}
        out[names.get(address, address)] = {
            k: state.get(k) for k in ("device", "batches", "samples", "failed_samples", "shipments", "shared_batches",
                                      "compute_seconds", "ooms", "recent_mean_batch", "recent_throughput", "memory_cap")
        } | {"controller": {k: controller.get(k) for k in ("size", "phase", "reason", "best_size")}}
    return out


def during(before: dict, after: dict, seconds: float) -> dict:
    """The servers' work between two :func:`served` snapshots: batches, their mean size, and the
    fraction of ``seconds`` the device spent computing."""
    out = {}
    for worker, now in after.items():
        then = before.get(worker) or {}
        batches = (now["batches"] or 0) - (then.get("batches") or 0)
        rows = (now["samples"] or 0) - (then.get("samples") or 0)
        busy = (now["compute_seconds"] or 0) - (then.get("compute_seconds") or 0)
        out[worker] = {"batches": batches, "rows": rows, "mean_batch": rows / batches if batches else None,
                       "device_busy": busy / seconds if seconds else None}
    return out


def placement(records: list[dict], names: dict[str, str]) -> dict:
    """Which worker ran the tasks of each layer: ``{layer: {worker name: tasks}}`` (a check that the
    images were made on the CPU workers and the hand-written model ran on the GPU worker)."""
    from dask.utils import key_split

    out: dict[str, Counter] = {}
    for r in records:
        out.setdefault(key_split(r["key"]), Counter())[names.get(r["worker"], r["worker"])] += 1
    return {k: dict(v) for k, v in out.items()}


def gpu_free_gib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free / 2**30
    except Exception:  # no NVML here (the smoke run): not recorded
        return None


def terminate(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="images of predict and the best map_blocks")
    parser.add_argument("--probe-rows", type=int, default=65_536, help="images of each map_blocks chunking's first run")
    parser.add_argument("--warm-rows", type=int, default=50_000, help="images of predict's untimed pass")
    parser.add_argument("--predict-chunk", type=int, default=None, help="rows per block of predict's images (512)")
    parser.add_argument("--cpu-workers", type=int, default=5)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--gpu-threads", type=int, default=2)
    parser.add_argument("--hog-keep-gib", type=float, default=3.0)
    parser.add_argument("--pressure-chunks", default="4096", help="map_blocks chunkings run under the neighbour")
    parser.add_argument("--pressure-rows", type=int, default=32_768, help="images of each map_blocks run under the neighbour")
    parser.add_argument("--skip-pressure", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes on a CPU (the GPU worker's resource is only a label)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.smoke:  # its own sizes, unless given
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for key, value in SMOKE_ARGS.items():
            if key not in given:
                setattr(args, key, value)
    size = dict(SIZES["smoke" if args.smoke else "full"])
    if args.predict_chunk:
        size["predict_chunk"] = args.predict_chunk
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = NAME + ("_smoke" if args.smoke else "")
    origin = time.perf_counter()

    def say(*what) -> None:
        print(f"[{time.perf_counter() - origin:6.1f} s]", *what, flush=True)

    result: dict = {"machine": machine_stamp(), "rows": args.rows, "probe_rows": args.probe_rows,
                    "warm_rows": args.warm_rows, "image_shape": size["shape"], "chunks": list(size["chunks"]),
                    "predict_chunk": size["predict_chunk"], "model": size["load"].__name__,
                    "cluster": {"cpu_workers": args.cpu_workers, "cpu_threads": args.cpu_threads,
                                "gpu_threads": args.gpu_threads},
                    "throughput": {}, "contenders": {}, "errors": {}, "section_seconds": {},
                    "targets": {"ratio_to_ceiling": 0.9, "ratio_to_map_blocks": 1.0}}
    try:
        result["dev_shm_free_gib"] = shutil.disk_usage("/dev/shm").free / 2**30
    except OSError:
        pass

    def checkpoint() -> None:
        save(name, result, out)

    # a time limit's SIGTERM unwinds like an error: the neighbour lets go of the GPU, the cluster
    # closes, what was measured is saved (once: timeout signals this process and then its group)
    signal.signal(signal.SIGTERM, terminate)
    try:
        run(args, size, result, checkpoint, say)
    except BaseException:
        result["errors"]["run"] = traceback.format_exc()[-3000:]
        say("failed:", traceback.format_exc()[-1500:])
        if not isinstance(sys.exc_info()[1], Exception):
            result["seconds_total"] = time.perf_counter() - origin
            checkpoint()
            raise
    result["seconds_total"] = time.perf_counter() - origin
    checkpoint()
    try:
        plot(result, out / f"{name}.png")
    except Exception as exc:  # the numbers are saved; a missing plot is not worth failing the run for
        say("no plot:", exc)
    summary = {k: result.get(k) for k in ("ceiling", "throughput", "ratio_to_ceiling", "ratio_to_map_blocks",
                                          "best_map_blocks_chunk", "section_seconds")}
    summary["errors"] = list(result["errors"])
    summary["pressure"] = {k: {kk: vv for kk, vv in v.items() if kk in ("failed_rows", "failed_blocks", "rows", "blocks")}
                           for k, v in result.get("pressure", {}).items() if isinstance(v, dict)}
    say(json.dumps(summary, default=float))
    if args.smoke:
        check_smoke(result)
        say("smoke run: every code path ran")


def run(args, size: dict, result: dict, checkpoint, say) -> None:
    import dask
    from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

    # Dask's low-level fusion of array tasks drops their annotations (the images would be made on
    # any worker, the GPU worker's resource would restrict nothing); blockwise fusion keeps them
    dask.config.set({"optimization.fuse.active": False})
    shape, load, classes = size["shape"], size["load"], 10 if args.smoke else 1000
    group = math.gcd(*size["chunks"], size["predict_chunk"])
    cpu = {"nthreads": args.cpu_threads, "memory_limit": "4GB" if args.smoke else "18GB",
           "env": {"CUDA_VISIBLE_DEVICES": ""}}
    workers = {f"cpu-{i}": {"cls": Nanny, "options": dict(cpu)} for i in range(args.cpu_workers)}
    workers["gpu"] = {"cls": Nanny, "options": {"nthreads": args.gpu_threads, "resources": {"GPU": 1},
                                               "memory_limit": "4GB" if args.smoke else "32GB"}}
    cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})
    client = Client(cluster)
    try:
        client.wait_for_workers(len(workers))
        client.register_plugin(ddb.DynBatchPlugin())

        def roles() -> tuple[str, list[str], dict[str, str]]:
            info = client.scheduler_info(n_workers=-1)["workers"]
            names = {a: str(w["name"]) for a, w in info.items()}
            gpu = next(a for a, n in names.items() if n == "gpu")
            return gpu, sorted(a for a, n in names.items() if n != "gpu"), names

        gpu, cpus, names = roles()
        say("cluster up:", sorted(names.values()))

        def array(n: int, chunk: int):
            return images(n, chunk, shape, group, cpus)

        def timed(key: str, n: int, chunk: int, compute) -> np.ndarray:
            with get_task_stream(client) as stream:
                started = time.perf_counter()
                total = compute()
                seconds = time.perf_counter() - started
            result["contenders"][key] = {"rows": n, "chunk": chunk, "seconds": seconds, "throughput": n / seconds,
                                         "placement": placement(stream.data, names)}
            result["throughput"][key] = n / seconds
            say(f"{key}: {n:,} images in {seconds:.1f} s = {n / seconds:,.0f} images/s")
            checkpoint()
            return total

        def section(key: str, fn) -> None:
            """One section; its failure is recorded and the next one runs."""
            started = time.perf_counter()
            try:
                fn()
            except Exception:
                result["errors"][key] = traceback.format_exc()[-3000:]
                say(f"{key} failed:", traceback.format_exc()[-1500:])
            result["section_seconds"][key] = time.perf_counter() - started
            checkpoint()

        sums: dict[str, np.ndarray] = {}

        def raw() -> None:
            """The eager ceiling, in the GPU worker."""
            row = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
            table = client.run(baselines.raw_loop, load, row, size["raw_batches"], size["raw_seconds"], workers=[gpu])[gpu]
            result["raw"] = {str(k): v for k, v in table.items()}
            result["ceiling"] = max(table.values())
            say("raw", {k: round(v) for k, v in table.items()})

        def predict() -> None:
            spec = ddb.ModelSpec("resnet50-collection", load=load, resources={"GPU": 1})
            with ddb.Batcher(client, spec) as batcher:
                started = time.perf_counter()
                batcher.predict(array(args.warm_rows, size["predict_chunk"])).sum(axis=0, dtype=np.float64).compute()
                result["predict_warm"] = {"rows": args.warm_rows, "seconds": time.perf_counter() - started}
                say(f"predict untimed pass: {args.warm_rows / result['predict_warm']['seconds']:,.0f} images/s")
                x = array(args.rows, size["predict_chunk"])
                before = served(client, spec.name, names)
                sums["predict"] = timed("predict", args.rows, size["predict_chunk"],
                                        lambda: batcher.predict(x).sum(axis=0, dtype=np.float64).compute())
                got = result["contenders"]["predict"]
                got["servers"] = served(client, spec.name, names)  # totals: the untimed pass too
                got["timed"] = during(before, got["servers"], got["seconds"])
                say("predict's device batches:", got["timed"])

        def map_blocks() -> None:
            for chunk in size["chunks"]:  # untimed: the cached model loads, each block shape runs once
                with unfused():
                    by_blocks(array(2 * chunk, chunk), load, classes).sum(axis=0, dtype=np.float64).compute()
            say("map_blocks warmed up")
            for chunk in size["chunks"]:
                x = array(args.probe_rows, chunk)
                with unfused():
                    timed(f"map_blocks_{chunk}", args.probe_rows, chunk,
                          lambda: by_blocks(x, load, classes).sum(axis=0, dtype=np.float64).compute())
            best = max(size["chunks"], key=lambda c: result["throughput"][f"map_blocks_{c}"])
            result["best_map_blocks_chunk"] = best
            x = array(args.rows, best)
            with unfused():
                sums["map_blocks_best"] = timed("map_blocks_best", args.rows, best,
                                                lambda: by_blocks(x, load, classes).sum(axis=0, dtype=np.float64).compute())
            result["best_map_blocks"] = result["throughput"]["map_blocks_best"]

        section("raw", raw)
        section("predict", predict)
        section("map_blocks", map_blocks)
        got = result["throughput"]
        if "predict" in got and result.get("ceiling"):
            result["ratio_to_ceiling"] = got["predict"] / result["ceiling"]
        if "predict" in got and result.get("best_map_blocks"):
            result["ratio_to_map_blocks"] = got["predict"] / result["best_map_blocks"]
            # the same rows through the same model: the sums of the logits agree (fp16 at other batch sizes)
            result["sum_check"] = relative_difference(sums["predict"], sums["map_blocks_best"])
        say("predict / ceiling", result.get("ratio_to_ceiling"), "predict / best map_blocks",
            result.get("ratio_to_map_blocks"), "sums differ by", result.get("sum_check"))
        checkpoint()
        if not args.skip_pressure:
            section("pressure", lambda: pressure(args, client, size, result, checkpoint, say, roles, sums.get("predict"),
                                                 classes, group))
    finally:
        client.close()
        cluster.close()


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-12, float(np.max(np.abs(b)))))


def pressure(args, client, size, result, checkpoint, say, roles, reference, classes, group) -> None:
    """The neighbour holds the GPU's memory; the GPU worker restarts under it (nothing cached); then
    dask-dynbatch and the hand-written large chunks run over the same images."""
    import dask.array as da
    from distributed import futures_of, get_task_stream
    from gpu_case import HOG, release_hog, start_hog

    shape, load = size["shape"], size["load"]
    out = {"hog_keep_gib": args.hog_keep_gib, "events": []}
    result["pressure"] = out
    origin = time.perf_counter()

    def event(what: str) -> None:
        out["events"].append((time.perf_counter() - origin, what, gpu_free_gib()))
        say("pressure:", what)

    hog_path = Path(args.out) / "hog.py"
    hog_path.write_text(FAKE_HOG if args.smoke else HOG)
    hog, lines = start_hog(hog_path, args.hog_keep_gib)
    try:
        event("hog holds the GPU")
        client.restart_workers(["gpu"])  # its memory goes back; the hog takes what it can of it
        time.sleep(2)
        gpu, cpus, names = roles()
        event("GPU worker restarted")
        spec = ddb.ModelSpec("resnet50-collection-pressure", load=load, resources={"GPU": 1})
        with ddb.Batcher(client, spec) as batcher:
            x = images(args.rows, size["predict_chunk"], shape, group, cpus)
            preds = batcher.predict(x, on_error="missing")
            before = served(client, spec.name, names)
            started = time.perf_counter()
            failed, total = da.compute(da.isnan(preds).any(axis=1).sum(), da.nansum(preds, axis=0, dtype=np.float64))
            seconds = time.perf_counter() - started
            servers = served(client, spec.name, names)
        out["predict"] = {"rows": args.rows, "failed_rows": int(failed), "seconds": seconds,
                          "throughput": args.rows / seconds, "servers": servers,
                          "timed": during(before, servers, seconds)}
        if reference is not None and not failed:
            out["predict"]["sum_check"] = relative_difference(total, reference)
        result["throughput"]["predict_pressure"] = args.rows / seconds
        event(f"predict: {int(failed)} of {args.rows:,} rows failed, {args.rows / seconds:,.0f} images/s")
        checkpoint()
        for chunk in (int(c) for c in args.pressure_chunks.split(",")):
            x = images(args.pressure_rows, chunk, shape, group, cpus)
            # in the smoke run no memory runs out: blocks larger than the smallest chunking fail instead
            started = time.perf_counter()
            errors, failed_blocks, failed_rows = set(), 0, 0
            # a future per block, each block's failure counted (compute() would stop at the first);
            # persisted, not to_delayed(): delayed objects lose the layers' annotations
            with unfused(), get_task_stream(client) as stream:
                y = client.persist(by_blocks(x, load, classes, fail_over=min(size["chunks"]) if args.smoke else None))
                futures = futures_of(y)
                for f in futures:
                    if f.exception() is not None:
                        failed_blocks += 1
                        failed_rows += x.chunks[0][f.key[1]]
                        errors.add(f"{type(f.exception()).__name__}: {str(f.exception())[:160]}")
                del y
            out[f"map_blocks_{chunk}"] = {"rows": args.pressure_rows, "chunk": chunk, "blocks": len(futures),
                                          "failed_blocks": failed_blocks, "failed_rows": failed_rows, "errors": sorted(errors),
                                          "seconds_incl_model_load": time.perf_counter() - started,
                                          "placement": placement(stream.data, names)}
            event(f"map_blocks {chunk}: {failed_blocks} of {len(futures)} blocks failed")
            checkpoint()
    finally:
        try:
            release_hog(hog)
        except OSError:  # it is gone already (a time limit signals the whole process group)
            hog.kill()
            hog.wait()
        hog_path.unlink(missing_ok=True)
        event("hog released")


def check_smoke(result: dict) -> None:
    """What the smoke run must show: every contender ran, on the workers it belongs to."""
    assert not result.get("errors"), result.get("errors")
    for key in ("predict", "map_blocks_best", *(f"map_blocks_{c}" for c in result["chunks"])):
        assert result["throughput"].get(key), key
    for key, got in result["contenders"].items():
        made = {w for layer, where in got["placement"].items() if layer == "images" for w in where}
        assert made and "gpu" not in made, (key, got["placement"])
        if key.startswith("map_blocks"):
            ran = {w for layer, where in got["placement"].items() if layer.startswith("model-blocks") for w in where}
            assert ran == {"gpu"}, (key, got["placement"])
    assert result["contenders"]["predict"]["servers"].keys() == {"gpu"}, result["contenders"]["predict"]["servers"]
    assert result["sum_check"] < 1e-3, result["sum_check"]
    if "pressure" not in result:  # --skip-pressure
        return
    pressure = result["pressure"]
    assert pressure["predict"]["failed_rows"] == 0 and pressure["predict"]["sum_check"] < 1e-3, pressure["predict"]
    assert pressure["predict"]["servers"].keys() == {"gpu"}, pressure["predict"]
    for key, got in pressure.items():
        if key.startswith("map_blocks"):  # blocks larger than the smallest chunking stand for OOMs
            assert got["failed_blocks"] == (got["blocks"] if got["chunk"] > min(result["chunks"]) else 0), got
            ran = {w for layer, where in got["placement"].items() if layer.startswith("model-blocks") for w in where}
            assert ran == {"gpu"}, got["placement"]


def plot(result: dict, path: Path) -> None:
    rows = {k: v["rows"] for k, v in result["contenders"].items()} | {"predict_pressure": result["rows"]}
    throughput = {f"{k}\n{rows.get(k, 0):,} rows": v for k, v in result["throughput"].items()}
    colors = ["tab:blue" if k.startswith("predict") else "tab:gray" for k in result["throughput"]]
    if result.get("ceiling"):
        throughput = {"raw (ceiling)": result["ceiling"]} | throughput
        colors = ["tab:green"] + colors
    model = "ResNet-50 fp16" if result["model"] == "build_resnet50" else result["model"]
    device = result["machine"].get("gpu", "CPU").split(",")[0]
    ratio = result.get("ratio_to_ceiling")
    title = (f"images made on CPU workers, {model} on {device}: "
             + (f"predict / ceiling {ratio:.2f}, / best map_blocks {result['ratio_to_map_blocks']:.2f}" if ratio else "incomplete"))
    throughput_bars(path, throughput, colors, "images/s", title)


if __name__ == "__main__":
    main()
