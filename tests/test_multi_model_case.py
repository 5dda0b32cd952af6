"""The pure parts of benchmarks/multi_model_case.py: static sizes from a sweep, the arrival schedule,
the per-phase summary and the crop step (the GPU run itself is on the device machine; ``--smoke``
runs every code path on a CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multi_model_case as mm  # noqa: E402

MB = 1 << 20


def sweep_table() -> dict:
    """Throughput levelling off with size; the segmenter 20x the classifier's memory per sample."""
    def rows(ladder, per_sample, best):
        return [{"rows": n, "throughput": best * n / (n + 4), "peak_bytes": per_sample * n} for n in ladder]

    return {"segmenter": rows([1, 2, 4, 8, 16, 32], 100 * MB, 500.0),
            "classifier": rows([1, 2, 4, 8, 16, 32, 64, 128], 5 * MB, 4000.0),
            "vit": rows([1, 2, 4, 8, 16, 32, 64, 128], 4 * MB, 2000.0)}


def test_static_sizes_fit_together_or_on_average():
    table = sweep_table()
    room = 2000 * MB
    safe = mm.choose_static(table, room)
    peak = {name: mm.row_at(table, name, safe[name])["peak_bytes"] for name in mm.MODELS}
    assert sum(peak.values()) <= room  # all three batches at once fit
    busy = {"segmenter": 0.4, "classifier": 0.35, "vit": 0.25}
    average = mm.choose_static(table, room, busy)
    average_peak = {name: mm.row_at(table, name, average[name])["peak_bytes"] for name in mm.MODELS}
    assert sum(busy[name] * average_peak[name] for name in mm.MODELS) <= room
    assert sum(average_peak.values()) > room  # ... but not all three at once: it can run out of memory
    assert all(average[name] >= safe[name] for name in mm.MODELS)
    # nothing fits: the smallest sizes
    assert mm.choose_static(table, MB) == {name: 1 for name in mm.MODELS}


def test_average_busy_shares_add_up_to_the_mean_load():
    cost = mm.request_cost(sweep_table(), {"segmenter": 8, "classifier": 64, "vit": 64}, crops_per_job=3.0)
    busy = mm.average_busy(cost, 3.0)
    mean_load = sum(sum(mix.values()) for _name, mix in mm.PHASES) / len(mm.PHASES)
    assert abs(sum(busy.values()) - mean_load) < 1e-9


def test_schedule_is_deterministic_and_follows_the_rates():
    rates = [{"segmenter": 50.0, "classifier": 0.0, "vit": 10.0, "pipeline": 5.0},
             {"segmenter": 0.0, "classifier": 200.0, "vit": 0.0, "pipeline": 0.0},
             {"segmenter": 20.0, "classifier": 20.0, "vit": 20.0, "pipeline": 20.0}]
    one, two = mm.make_schedule(rates, 10.0, seed=3), mm.make_schedule(rates, 10.0, seed=3)
    assert all(np.array_equal(one[k], two[k]) for k in one)
    arrival, kind = one["arrival"], one["kind"]
    assert np.all(np.diff(arrival) >= 0) and arrival.min() >= 0 and arrival.max() < 30
    second = (arrival >= 10) & (arrival < 20)
    assert set(kind[second].tolist()) == {mm.KINDS.index("classifier")}
    assert abs(second.sum() - 2000) < 5 * np.sqrt(2000)
    segmenter_pool = one["pool_index"][(kind == 0) | (kind == mm.PIPELINE)]
    assert segmenter_pool.max() < mm.POOL["segmenter"]


def test_summary_counts_failed_and_unfinished_and_their_latency():
    seconds = 1.0
    # phase 0: three classifier requests, one failed; phase 2: a segmenter request never finished
    schedule = {"arrival": np.array([0.1, 0.2, 0.3, 2.5]), "kind": np.array([1, 1, 1, 0], dtype=np.int8)}
    done = np.array([0.15, 0.4, 0.5, np.nan])
    ok = np.array([True, True, False, False])
    cost = {kind: 0.01 for kind in mm.KINDS}
    summary = mm.summarize(schedule, done, ok, seconds, cost)
    first, last = summary["phases"][0], summary["phases"][2]
    assert first["kinds"]["classifier"]["failed"] == 1
    assert first["kinds"]["classifier"]["served_per_s"] == 2.0
    assert round(first["kinds"]["classifier"]["p99_ms"]) == 200  # the slower of the two served
    assert last["kinds"]["segmenter"]["unfinished"] == 1
    assert last["kinds"]["segmenter"]["p99_ms"] is None and not last["kept_up"]
    assert (summary["failed"], summary["unfinished"], summary["requests"]) == (1, 1, 4)
    assert summary["served_per_s"] == 2 / 3


def test_crop_regions_gives_classifier_sized_crops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:12, 4:12] = 3  # a second region: 6 % of the map
    crops = mm.crop_regions((mask, image), side=32)
    assert mm.MIN_CROPS <= len(crops) <= mm.MAX_CROPS
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    # the region's box, cut from the image at twice the map's resolution
    assert np.array_equal(crops[1], mm._resize(image[8:24, 8:24], 32))
