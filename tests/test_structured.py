"""Structured samples (tuples, dicts, nested, scalar leaves), variable lengths with ``pad_value``,
per-row list outputs and cost-based batches: the pure pieces, then real clusters (in-process, and
processes over shared memory and over the comm), and a tiny BERT whose batched outputs equal each
request run alone."""

from __future__ import annotations

import asyncio

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.core.formation import CostQueue, Part
from dask_dynbatch.core.tree import (
    Ragged,
    Structure,
    TreeRows,
    flatten,
    leaf_paths,
    learn_fixed,
    trim_output_row,
    unflatten,
)

WAIT = 60


# -- pure pieces ---------------------------------------------------------------------------------


def test_flatten_keeps_structure_paths_and_scalar_leaves():
    sample = {"image": np.zeros((2, 2)), "meta": (3, np.float32(0.5)), "tags": [np.arange(2)]}
    tree, leaves = flatten(sample)
    assert leaf_paths(tree) == ["['image']", "['meta'][0]", "['meta'][1]", "['tags'][0]"]
    assert [leaf.shape for leaf in leaves] == [(2, 2), (), (), (2,)]
    back = unflatten(tree, leaves)
    assert isinstance(back["meta"], tuple) and isinstance(back["tags"], list)
    assert back["meta"][0] == 3 and back["image"].shape == (2, 2)


def test_ragged_rows_slice_join_and_pad():
    rows = TreeRows.stack(("dict", ("ids", "x"), (("leaf",), ("leaf",))),
                          [[np.arange(1, 4), np.float32(1)], [np.arange(1, 2), np.float32(2)],
                           [np.arange(1, 6), np.float32(3)]], ragged=[True, False])
    assert len(rows) == 3 and rows.lengths().tolist() == [3, 1, 5]
    tail = rows[1:]
    assert tail.lengths().tolist() == [1, 5] and tail.leaves[1].tolist() == [2, 3]
    joined = TreeRows.concat([rows[:1], tail])
    leaves, length = joined.padded([0, None])
    assert length == 5
    assert leaves[0].tolist() == [[1, 2, 3, 0, 0], [1, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert Ragged.of([np.ones(2), np.ones(2)]).padded(2, 0).shape == (2, 2)
    # rows gathered by index: what joining their single rows gives, in the order asked
    costs = TreeRows(rows.tree, rows.leaves, np.array([1.0, 2.0, 3.0]))
    taken = costs.take(np.array([2, 0]))
    single = TreeRows.concat([costs[2:3], costs[0:1]])
    assert taken.lengths().tolist() == [5, 3] and taken.costs.tolist() == [3.0, 1.0]
    assert [leaf.tolist() for leaf in taken.padded([0, None])[0]] == [leaf.tolist() for leaf in single.padded([0, None])[0]]
    assert len(rows.take(np.array([], dtype=np.int64))) == 0


def test_structure_names_the_leaf_that_does_not_fit():
    tree, leaves = flatten({"ids": np.arange(4), "mask": np.ones(4)})
    structure = Structure(tree, [(None,), (None,)], [np.int64, np.float64], [0, 0])
    assert structure.mismatch(tree, leaves) is None and structure.length(leaves) == 4
    _, bad = flatten({"ids": np.arange(4), "mask": np.ones(3)})
    assert "one length; leaf ['mask'] has 3, an earlier one 4" in structure.mismatch(tree, bad)
    _, bad = flatten({"ids": np.arange(4.0), "mask": np.ones(4)})
    assert "leaf ['ids'] must have shape (L,) and dtype int64" in structure.mismatch(tree, bad)
    other, leaves = flatten((np.arange(4), np.ones(4)))
    assert "received a tuple of 2" in structure.mismatch(other, leaves)


def _queue_of(lengths, priority=0, padded=True, costs=None):
    rows = TreeRows.stack(("leaf",), [[np.zeros(n, dtype=np.int8)] for n in lengths], [True], costs)
    queue = CostQueue(padded=padded)
    queue.push([Part("shipment", 0, rows, priority)])
    return queue


def _lengths(parts):
    """The lengths of every row of ``parts``, in order."""
    return [int(n) for p in parts for n in p.rows.lengths()]


def test_cost_queue_batches_similar_lengths_within_the_budget_and_keeps_the_oldest_first():
    lengths = [50, 10, 52, 11, 49, 12, 51, 9]
    queue = _queue_of(lengths)
    taken = queue.take(budget=4 * 52)
    assert _lengths(taken) == [50, 52, 49, 51]  # the oldest row (50) and its neighbours in length, in arrival order
    (part,) = taken  # gathered from the one part pushed: one part, knowing which rows of it it holds
    assert part.row_ids() == [0, 2, 4, 6] and part.ids is not None
    assert [r[0].tolist() for r in (part.rows.row(i) for i in range(4))] == [[0] * 50, [0] * 52, [0] * 49, [0] * 51]
    assert len(queue) == 4 and queue.cost == 10 + 11 + 12 + 9
    rest = queue.take(budget=1000)
    assert _lengths(rest) == [10, 11, 12, 9] and rest[0].row_ids() == [1, 3, 5, 7]
    assert len(queue) == 0


def test_a_row_of_a_rare_length_is_passed_over_a_few_batches_at_most():
    queue = _queue_of([500] + [10] * 60)
    for _ in range(CostQueue.MAX_PASSES):  # batches of ten 10s waste nothing; the 500 alone is over the budget
        assert _lengths(queue.take(budget=100)) == [10] * 10
    assert _lengths(queue.take(budget=100)) == [500]  # passed over enough: it runs (alone: over the budget by itself)
    assert _lengths(queue.take(budget=100)) == [10] * 10
    queue = _queue_of([400] + [10] * 600)
    for _ in range(CostQueue.MAX_PASSES):  # a 400 beside one 10 would waste 390 of 800
        assert _lengths(queue.take(budget=1000)) == [10] * 100
    assert sorted(_lengths(queue.take(budget=1000))) == [10, 400]


def test_a_large_budget_chooses_among_more_rows():
    queue = _queue_of([10] * 20)  # rows of cost 10: a budget of 5,000 holds 500 of them
    assert queue._lookahead(100) == CostQueue.LOOKAHEAD
    assert queue._lookahead(5_000) == CostQueue.CHOICES * 500
    assert queue._lookahead(1e9) == CostQueue.MAX_LOOKAHEAD


def test_higher_priority_batches_between_do_not_reset_how_often_the_oldest_row_was_passed_over():
    queue = _queue_of([500] + [10] * 20)
    for i in range(3 * CostQueue.MAX_PASSES):
        if i % 2 == 0:  # a trickle of urgent rows: batches of their own, between the others
            queue.push([Part(f"urgent{i}", 0, TreeRows.stack(("leaf",), [[np.zeros(10, dtype=np.int8)]], [True]), 1)])
        queue.push([Part(f"more{i}", 0, TreeRows.stack(("leaf",), [[np.zeros(10, dtype=np.int8)]] * 10, [True]), 0)])
        if 500 in _lengths(queue.take(budget=100)):
            break
    else:
        raise AssertionError("the row of a rare length never ran")
    assert i < 2 * (CostQueue.MAX_PASSES + 1)


def _gathered_delivery(seed: int) -> None:
    """Random shipments (rows that failed on arrival, priority runs, suspects, several arrays) through
    the queue and both ways of delivering a batch's outputs: every row's output reaches its own
    message position, cut to its own length, once."""
    import random

    from dask_dynbatch.core.formation import DeviceBatch
    from dask_dynbatch.core.rows import split_rows
    from dask_dynbatch.worker.server import DeviceResult, ModelServer, Shipment

    class Server:
        _deliver = ModelServer._deliver
        _deliver_grouped = ModelServer._deliver_grouped
        _cut_back = ModelServer._cut_back
        weighed = True
        _fixed_outputs: set = set()

    rng = random.Random(seed)
    queue, server, shipments, truth = CostQueue(padded=True), Server(), [], {}
    for k in range(rng.randint(1, 4)):
        n = rng.randint(1, 25)
        failed = set(rng.sample(range(n), rng.randint(0, n // 3)))
        runs = [i for i in range(n) if i not in failed]
        if not runs:
            continue
        lengths = {i: rng.randint(1, 30) for i in runs}
        samples = [[np.full(lengths[i], k * 1000 + i, dtype=np.int64)] for i in runs]
        cut = rng.randint(0, len(runs))
        arrays = [TreeRows.stack(("x",), part, [True]) for part in (samples[:cut], samples[cut:]) if part]
        priorities = [(0, 0), (rng.randint(1, n - 1), 1)] if n > 2 and rng.random() < 0.5 else [(0, 0)]
        shipment = Shipment(f"c{k}", n, arrays, index=runs if failed else None, errors={i: ValueError() for i in failed},
                            priorities=priorities, isolate=rng.random() < 0.2)
        shipments.append(shipment)
        truth.update({(k, i): lengths[i] for i in runs})
        queue.push(shipment.parts())
    while len(queue):
        parts, lengths_, _ = queue.take_weighed(rng.choice([10, 60, 200, 1000]), rng.choice([None, 4]))
        batch = DeviceBatch(parts, 0.0, 100, length=int(max(lengths_)), real=int(sum(lengths_)), cost=1.0)
        out = TreeRows.concat([p.rows for p in parts]).padded([-1])[0][0][:, :, None].copy()  # each row's id
        mode = rng.choice(["grouped", "pieces", "errors"])
        if mode == "grouped":
            server._deliver_grouped(batch, out)
            continue
        n = batch.rows
        cuts = sorted({0, n, rng.randint(0, n), rng.randint(0, n)})  # as an out-of-memory split gives
        pieces = [(a, b, out[a:b]) for a, b in zip(cuts, cuts[1:]) if a < b]
        errors = {}
        if mode == "errors" and n > 1:  # one row failed alone, as poison bisection gives
            bad = rng.randrange(n)
            errors[bad] = RuntimeError("bad")
            pieces = [p for a, b, o in pieces
                      for p in ((a, min(b, bad), o[: min(b, bad) - a]), (max(a, bad + 1), b, o[max(a, bad + 1) - a :]))
                      if p[0] < p[1]]
        for part, start in zip(batch.parts, batch.starts):
            server._deliver(part, start, DeviceResult(pieces, errors, 0.0), batch.length)
    seen = set()
    for shipment in shipments:
        owner = int(shipment.client[1:])
        for rows, piece in shipment.pieces:
            for row, value in zip(rows, split_rows(piece, len(rows))):
                key = (owner, row)
                assert key in truth and key not in seen
                seen.add(key)
                value = np.asarray(value)
                assert value.shape[0] == truth[key] and (value == owner * 1000 + row).all()
        for row, error in shipment.errors.items():
            if isinstance(error, RuntimeError):
                assert (owner, row) not in seen
                seen.add((owner, row))
    assert seen == set(truth)


def test_gathered_rows_reach_their_own_requests_cut_to_their_own_lengths():
    async def all_seeds():  # (a Shipment's future needs a running loop)
        for seed in range(150):
            _gathered_delivery(seed)

    asyncio.run(all_seeds())


def test_a_weighed_shipment_is_charged_its_rows_share_of_a_batch_by_their_costs():
    from dask_dynbatch.core.formation import DeviceBatch
    from dask_dynbatch.worker.server import ModelServer

    def rows(costs):
        return TreeRows(("leaf",), [np.zeros((len(costs), 2))], np.array(costs, dtype=np.float64))

    cheap, dear = object(), object()
    batch = DeviceBatch([Part(cheap, 0, rows([1.0, 1.0])), Part(dear, 0, rows([6.0]))], 0.0, 8, cost=8.0)
    assert ModelServer._share(None, batch, cheap, 2) == pytest.approx(0.25)
    assert ModelServer._share(None, batch, dear, 1) == pytest.approx(0.75)
    padded = DeviceBatch([Part(cheap, 0, rows([1.0, 1.0])), Part(dear, 0, rows([6.0]))], 0.0, 8, cost=18.0, length=6)
    assert ModelServer._share(None, padded, dear, 1) == pytest.approx(1 / 3)  # padded alike: by rows


def test_cost_queue_takes_one_row_over_the_budget_and_honours_max_rows():
    queue = _queue_of([300, 5, 5, 5, 5])
    assert _lengths(queue.take(budget=1000, max_rows=2)) == [5, 5]
    assert _lengths(queue.take(budget=100)) == [5, 5]  # the 300 alone is over the budget: other rows first
    (only,) = queue.take(budget=100)  # then the row alone, whatever it costs
    assert _lengths([only]) == [300] and only.row_ids() == [0] and only.ids is None  # one row: a view


def test_cost_queue_takes_from_several_parts_in_arrival_order_and_drains_the_rest():
    queue = CostQueue(padded=True)
    for offset, lengths in ((0, [40, 8, 41]), (3, [9, 42, 7])):
        rows = TreeRows.stack(("leaf",), [[np.full(n, n, dtype=np.int16)] for n in lengths], [True])
        queue.push([Part("a" if offset == 0 else "b", offset, rows)])
    taken = queue.take(budget=3 * 42)
    assert [(p.owner, p.row_ids()) for p in taken] == [("a", [0, 2]), ("b", [4])]
    assert _lengths(taken) == [40, 41, 42] and int(taken[1].rows.row(0)[0][0]) == 42
    drained = queue.drain()
    assert [(p.owner, p.row_ids(), _lengths([p])) for p in drained] == [("a", [1], [8]), ("b", [3, 5], [9, 7])]
    assert len(queue) == 0 and queue.cost == 0


def test_a_row_that_still_fits_means_the_batch_did_not_stop_at_its_budget():
    queue = _queue_of([100] * 12)
    taken = queue.take_weighed(950)  # 9 rows of 100: a tenth would make 1,000
    assert len(taken[1]) == 9 and not queue.another_fits(950, taken[1], taken[2])
    mixed = _queue_of([10, 10] + [400] * 20)
    parts, lengths, costs = mixed.take_weighed(1000)
    assert queue.batch_cost(lengths, costs) < 0.5 * 1000  # cut by length, far from the budget
    assert mixed.another_fits(1000, [10], [10.0])  # a 400 would fit beside one 10 (2 x 400)
    weighed = _queue_of([1] * 6, padded=False, costs=[3.0, 3.0, 3.0, 1.0, 9.0, 9.0])
    parts, lengths, costs = weighed.take_weighed(7.0)  # 3 + 3; the next 3 does not fit...
    assert costs == [3.0, 3.0] and weighed.another_fits(7.0, lengths, costs)  # ...but the 1 behind it would


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=120)
async def test_a_row_limit_does_not_let_the_token_budget_grow_without_bound(c, s, a):
    # max_batch_size=4 stops every batch of 8-token rows at 4 rows, far below a token budget: such
    # batches are not full for the controller, which holds instead of doubling for ever
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("enc-rows4", load=build_encoder, pad_value=0, max_batch_size=4))
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, 8) for _ in range(3000)]
    for _ in range(2):
        await asyncio.gather(*batcher.map([{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids]))
    (worker,) = batcher.stats()["workers"].values()
    assert {h["device_batch"] for h in batcher.history()} <= {1, 2, 3, 4}
    assert worker["controller"]["size"] <= 64  # rows the clients are told: the budget stayed near 4 x 8 tokens
    batcher.close()


def test_weighed_queue_sums_costs_in_arrival_order():
    queue = _queue_of([1, 1, 1, 1], padded=False, costs=[5.0, 1.0, 3.0, 2.0])
    assert queue.mean_cost() == pytest.approx(2.75)
    assert sum(len(p) for p in queue.take(budget=6.5)) == 2  # 5 + 1; 5 + 1 + 3 would exceed it
    assert sum(len(p) for p in queue.take(budget=100)) == 2


def test_padded_outputs_are_cut_back_unless_seen_to_keep_their_size():
    length, hidden = 6, 6  # the pooled output's size happens to equal the padded length here
    fixed: set[str] = set()
    learn_fixed({"seq": np.zeros((3, 4, 8)), "pooled": np.zeros((3, hidden))}, 4, fixed)  # an earlier batch
    assert fixed == {"['pooled']"}
    row = {"seq": np.zeros((1, length, 8)), "pooled": np.zeros((1, hidden)), "labels": [np.arange(length)]}
    trimmed = trim_output_row(row, length, 2, fixed)
    assert trimmed["seq"].shape == (1, 2, 8) and trimmed["pooled"].shape == (1, hidden)
    assert trimmed["labels"][0].tolist() == [0, 1]


def test_pad_value_is_checked():
    with pytest.raises(ValueError, match="pad_value must be a number or a non-empty dict"):
        ddb.ModelSpec("m", load=lambda: None, pad_value="x")
    assert ddb.ModelSpec("m", load=lambda: None, pad_value=0, compile=True, buckets=[8, 16]).buckets == (8, 16)
    with pytest.raises(TypeError, match="cost must be callable"):
        ddb.ModelSpec("m", load=lambda: None, cost=3)


# -- models of the cluster tests -----------------------------------------------------------------


def build_tuple_model():
    """``model(images, metas)``: each image's sum plus its meta value."""
    return lambda images, metas: images.sum(axis=(1, 2)) + metas


def build_encoder():
    """A dict model of variable-length token ids: per-token features and a pooled output; a
    sample whose first token is -1 makes it raise (a poison request)."""

    def model(input_ids, attention_mask):
        if (input_ids[:, 0] == -1).any():
            raise ValueError("poison token")
        hidden = input_ids[..., None] * np.arange(1.0, 4.0) + attention_mask[..., None]
        return {"last_hidden_state": hidden, "pooler_output": (hidden * attention_mask[..., None]).sum(axis=1)}

    return model


def expected_encoder(ids: np.ndarray) -> dict:
    hidden = ids[:, None] * np.arange(1.0, 4.0) + 1.0
    return {"last_hidden_state": hidden, "pooler_output": hidden.sum(axis=0)}


def build_labeller():
    """One Python value per row: a list output."""
    return lambda batch: [f"row-{int(v)}" * (1 + int(v) % 2) for v in batch[:, 0]]


def token_requests(n: int, seed: int = 0, low: int = 2, high: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, int(length)) for length in rng.integers(low, high, n)]


def check_encoder_results(ids_list, futures):
    for ids, future in zip(ids_list, futures):
        out = future.result(timeout=WAIT)
        want = expected_encoder(ids)
        assert out["last_hidden_state"].shape == (len(ids), 3)
        np.testing.assert_allclose(out["last_hidden_state"], want["last_hidden_state"])
        np.testing.assert_allclose(out["pooler_output"], want["pooler_output"])


# -- in-process clusters -------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_tuple_dict_nested_and_list_outputs(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    tuples = await ddb.Batcher(c, ddb.ModelSpec("tuples", load=build_tuple_model))
    results = await asyncio.gather(*tuples.map([(np.full((2, 2), float(i)), i) for i in range(60)]))
    assert [float(r) for r in results] == [5.0 * i for i in range(60)]
    with pytest.raises(ddb.InputSignatureError, match=r"leaf \[1\] must have shape \(\) and dtype int64"):
        tuples.submit((np.zeros((2, 2)), 1.5))
    with pytest.raises(ddb.InputSignatureError, match=r"received a dict with keys \['a'\]"):
        tuples.submit({"a": np.zeros((2, 2))})
    # in map, a sample that does not fit fails alone and its error names its index
    futures = tuples.map([(np.ones((2, 2)), 1), (np.ones((3, 2)), 1), (np.ones((2, 2)), 2)])
    await asyncio.gather(*futures, return_exceptions=True)
    assert futures[0].result() == 5.0 and futures[2].result() == 6.0
    assert str(futures[1].exception()).startswith("sample 1 of map(): model 'tuples': leaf [0] must have shape (2, 2)")
    tuples.close()

    nested = await ddb.Batcher(c, ddb.ModelSpec(
        "nested", load=lambda: lambda x, opts: {"y": x * opts["scale"][:, None], "n": (opts["n"], opts["scale"])}))
    out = await nested.submit({"x": np.arange(3.0), "opts": {"scale": 2.0, "n": 7}})
    assert out["y"].tolist() == [0.0, 2.0, 4.0] and out["n"] == (7, 2.0)
    nested.close()

    labels = await ddb.Batcher(c, ddb.ModelSpec("labels", load=build_labeller))
    got = await asyncio.gather(*labels.map([np.array([float(i)]) for i in range(30)]))
    assert got == [f"row-{i}" * (1 + i % 2) for i in range(30)]
    labels.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_padded_dict_samples_poison_futures_and_padding_waste(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("enc", load=build_encoder, pad_value=0))
    ids_list = token_requests(300)
    samples = [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in ids_list]
    poison = {"input_ids": np.array([-1, 5, 6]), "attention_mask": np.ones(3, dtype=np.int64)}
    futures = batcher.map(samples[:150] + [poison] + samples[150:])
    await asyncio.gather(*futures, return_exceptions=True)
    assert "poison token" in str(futures[150].exception())
    check_encoder_results(ids_list, futures[:150] + futures[151:])
    # Dask Futures as inputs: checked on the worker leaf by leaf
    good = c.submit(lambda: {"input_ids": np.arange(1, 8), "attention_mask": np.ones(7, dtype=np.int64)}, pure=False)
    bad = c.submit(lambda: {"input_ids": np.arange(1, 8), "attention_mask": np.ones(6, dtype=np.int64)}, pure=False)
    from_futures = batcher.map([good, bad])
    await asyncio.gather(*from_futures, return_exceptions=True)
    check_encoder_results([np.arange(1, 8)], from_futures[:1])
    assert "input from Dask Future" in str(from_futures[1].exception())
    assert "one length; leaf ['attention_mask'] has 6" in str(from_futures[1].exception())
    stats = batcher.stats()
    (worker,) = stats["workers"].values()
    assert worker["padding_waste"] is not None and 0 <= worker["padding_waste"] < 1
    assert stats["failed"] == 2 and stats["delivered"] == 301
    assert any(h["padding"] is not None for h in batcher.history())
    batcher.close()


# -- processes: shared memory and the comm -------------------------------------------------------


@pytest.mark.parametrize("shared_memory", [True, False])
def test_padded_samples_over_shared_memory_and_the_comm(shared_memory):
    with dask.config.set({"dynbatch.transport.shared-memory": shared_memory,
                          "dynbatch.transport.shared-memory-min-bytes": 0}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            spec = ddb.ModelSpec("enc-proc", load=build_encoder, pad_value={"input_ids": 0, "attention_mask": 0})
            with ddb.Batcher(client, spec) as batcher:
                ids_list = token_requests(400, seed=1)
                futures = batcher.map([{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in ids_list])
                check_encoder_results(ids_list, futures)
                transports = {w["transport"] for w in batcher.stats()["workers"].values()}
                assert transports == {"shared-memory" if shared_memory else "comm"}
                tuples = ddb.Batcher(client, ddb.ModelSpec("tuples-proc", load=build_tuple_model))
                got = [f.result(timeout=WAIT) for f in tuples.map([(np.full((2, 2), float(i)), i) for i in range(100)])]
                assert [float(g) for g in got] == [5.0 * i for i in range(100)]
                tuples.close()


# -- a tiny BERT ---------------------------------------------------------------------------------


def build_tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return BertModel(config).eval()


def test_tiny_bert_batched_outputs_equal_each_request_alone():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("tiny-bert", load=build_tiny_bert, pad_value=0)
        ids_list = token_requests(120, seed=2, low=3, high=100)
        with ddb.Batcher(client, spec) as batcher:
            futures = batcher.map([{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in ids_list])
            results = [f.result(timeout=WAIT) for f in futures]
            sizes = [h["device_batch"] for h in batcher.history()]
        model = build_tiny_bert()
        assert max(sizes) > 1  # requests of different lengths shared batches
        with torch.inference_mode():
            for ids, out in zip(ids_list, results):
                alone = model(input_ids=torch.from_numpy(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
                assert set(out) == {"last_hidden_state", "pooler_output"}
                assert out["last_hidden_state"].shape == (len(ids), 32) and out["pooler_output"].shape == (32,)
                np.testing.assert_allclose(out["last_hidden_state"], alone.last_hidden_state[0].numpy(), atol=1e-4)
                np.testing.assert_allclose(out["pooler_output"], alone.pooler_output[0].numpy(), atol=1e-4)


def tokenize(text: str) -> dict:
    """A CPU step: text to a dict sample of token ids of the text's own length."""
    ids = np.array([1 + ord(ch) % 40 for ch in text], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_pipeline_tokenizes_on_cpu_then_runs_padded_dict_samples(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    encoder = await ddb.Batcher(c, ddb.ModelSpec("enc-pipe", load=build_encoder, pad_value=0))
    pipe = ddb.Pipeline(c, [ddb.cpu(tokenize), ddb.model(encoder), ddb.cpu(lambda out: out["pooler_output"])])
    texts = ["a" * (1 + i % 17) + "xyz"[: i % 3] for i in range(80)]
    pooled = await asyncio.gather(*pipe.map(texts))
    for text, got in zip(texts, pooled):
        np.testing.assert_allclose(got, expected_encoder(tokenize(text)["input_ids"])["pooler_output"])
    encoder.close()


def test_rows_one_by_one_and_joined_again_are_the_rows():
    rng = np.random.default_rng(4)
    samples = [[rng.integers(0, 9, n), np.float32(n), rng.integers(0, 9, (n, 2))] for n in (3, 0, 5, 1)]
    rows = TreeRows.stack(("tuple", (("leaf",), ("leaf",), ("leaf",))), samples, [True, False, True], costs=[3, 1, 5, 2])
    singles = [rows.take(np.array([i])) for i in range(len(rows))]
    assert len(singles) == 4
    for i, one in enumerate(singles):
        want = rows[i : i + 1]
        assert one.lengths().tolist() == want.lengths().tolist() and one.costs.tolist() == want.costs.tolist()
        for a, b in zip(one.row(0), want.row(0)):
            np.testing.assert_array_equal(a, b)
    joined = TreeRows.concat([singles[2], singles[0], singles[1], singles[3]])  # any order
    taken = rows.take(np.array([2, 0, 1, 3]))  # the same rows gathered at once
    for got in (joined, taken):
        assert got.lengths().tolist() == [5, 3, 0, 1] and got.costs.tolist() == [5, 3, 1, 2]
        for i, src in enumerate((2, 0, 1, 3)):
            for a, b in zip(got.row(i), rows.row(src)):
                np.testing.assert_array_equal(a, b)


def test_a_shipments_rows_of_a_batch_travel_as_one_piece_and_are_cut_per_row_on_arrival():
    import pickle

    from dask_dynbatch.core.rows import TrimmedRows, split_rows, take_rows
    from dask_dynbatch.core.tree import follows_length

    length, n = 6, 4
    outputs = {"seq": np.arange(n * length * 2, dtype=np.float32).reshape(n, length, 2),
               "pooled": np.arange(n * length, dtype=np.float32).reshape(n, length),  # its size happens to be 6
               "labels": [np.arange(length) + i for i in range(n)]}
    fixed = {"['pooled']"}
    index, owns = [3, 0, 2], [6, 2, 5]
    piece = take_rows(outputs, index, n)
    assert piece["seq"].shape == (3, length, 2) and [int(v[0]) for v in piece["labels"]] == [3, 0, 2]
    assert follows_length(piece, length, fixed) and not follows_length({"pooled": piece["pooled"]}, length, fixed)
    travelled = pickle.loads(pickle.dumps(TrimmedRows(piece, length, owns, frozenset(fixed))))
    rows = split_rows(travelled, 3)
    for row, i, own in zip(rows, index, owns):  # as the worker cut each row alone before
        want = trim_output_row({k: (v[i : i + 1] if k != "labels" else [v[i]]) for k, v in outputs.items()},
                               length, own, fixed)
        np.testing.assert_array_equal(row["seq"], want["seq"][0])
        np.testing.assert_array_equal(row["pooled"], want["pooled"][0])
        np.testing.assert_array_equal(row["labels"], want["labels"][0])
    assert rows[1]["seq"].shape == (2, 2) and rows[1]["pooled"].shape == (length,)
    assert take_rows(outputs["seq"], [1, 2], n).base is not None  # consecutive rows: a view
    with pytest.raises(ValueError, match="keep the batch dimension"):
        take_rows(np.float32(1.0), [0], n)


def test_trimmed_rows_slice_like_outputs_and_a_ragged_join_keeps_empty_rows():
    from dask_dynbatch.core.rows import TrimmedRows, slice_rows, split_rows
    from dask_dynbatch.core.tree import Ragged

    piece = TrimmedRows({"seq": np.ones((3, 4, 2))}, 4, [4, 1, 2], frozenset())
    tail = slice_rows(piece, 1, 3, 3)
    assert [r["seq"].shape for r in split_rows(tail, 2)] == [(1, 2), (2, 2)]
    joined = Ragged.concat([Ragged.of([np.zeros(0), np.ones(2)]), Ragged.of([np.ones(3)])[0:1], Ragged.of([np.zeros(0)])])
    assert joined.lengths.tolist() == [0, 2, 3, 0] and len(joined.values) == 5
