"""Many requests at once: ``Batcher.predict`` (an array in, one array out), ``ddb.gather`` and the
progress bar over request futures."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from distributed import Client, LocalCluster
from models import build_poisoned

import dask_dynbatch as ddb
from dask_dynbatch.client.bulk import BLOCK_ROWS, stack_results
from dask_dynbatch.client.progress import ProgressBar
from dask_dynbatch.examples import build_affine


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        yield client


def test_predict_returns_one_array_in_order(client):
    x = np.arange(30_000 * 3, dtype=np.float64).reshape(30_000, 3)
    with ddb.Batcher(client, ddb.ModelSpec("affine-bulk", load=build_affine)) as batcher:
        y = batcher.predict(x)
        assert isinstance(y, np.ndarray) and y.shape == x.shape
        np.testing.assert_array_equal(y, 2 * x + 1)
        assert len(batcher.predict(x[:0])) == 0
        assert batcher.stats()["delivered"] == 30_000


def test_predict_checks_the_whole_array_against_the_signature(client):
    with ddb.Batcher(client, ddb.ModelSpec("affine-sig", load=build_affine, input_shape=(3,),
                                           input_dtype="float64")) as batcher:
        with pytest.raises(ddb.InputSignatureError, match=r"shape \(5, 4\)"):
            batcher.predict(np.zeros((5, 4)))
        with pytest.raises(ddb.InputSignatureError, match="float32"):
            batcher.predict(np.zeros((5, 3), dtype=np.float32))
        assert batcher.stats()["submitted"] == 0  # nothing of a refused array was queued


def test_predict_raises_the_failure_of_a_row_and_counts_its_block_failed(client):
    x = np.ones((2 * BLOCK_ROWS + 200, 2))
    x[BLOCK_ROWS + 17, 0] = -1.0  # in the second block
    with ddb.Batcher(client, ddb.ModelSpec("poisoned-bulk", load=build_poisoned)) as batcher:
        with pytest.raises(ValueError, match="poison sample"):
            batcher.predict(x)
        batcher.close(drain=True)
        stats = batcher.stats()
    # the rows of a block share its one fate; the other blocks ran
    assert stats["failed"] == BLOCK_ROWS and stats["delivered"] == BLOCK_ROWS + 200


def test_predict_torch_tensor_in_tensor_out(client):
    torch = pytest.importorskip("torch")
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    with ddb.Batcher(client, ddb.ModelSpec("affine-torch-bulk", load=build_affine)) as batcher:
        y = batcher.predict(x)
        assert isinstance(y, torch.Tensor)
        assert torch.equal(y, 2 * x + 1)


def test_gather_stacks_rows_of_one_shape_else_returns_a_list(client):
    with ddb.Batcher(client, ddb.ModelSpec("affine-gather", load=build_affine)) as batcher:
        futures = batcher.map([np.full(4, float(i)) for i in range(100)])
        out = ddb.gather(futures)
        assert out.shape == (100, 4) and out[:, 0].tolist() == [2.0 * i + 1 for i in range(100)]
    mixed = [np.zeros(2), np.zeros(3)]
    assert stack_results(mixed) is mixed
    tuples = [(np.zeros(2), np.ones(1))] * 3
    assert stack_results(tuples) is tuples
    assert stack_results([]) == []


def test_text_progress_bar_follows_the_futures_to_the_end(client):
    with ddb.Batcher(client, ddb.ModelSpec("affine-progress", load=build_affine)) as batcher:
        futures = batcher.map([np.full(2, float(i)) for i in range(5_000)])
        out = io.StringIO()
        bar = ProgressBar(futures, notebook=False, file=out, interval=0.01)
        assert bar.wait(timeout=60)
        assert all(f.done() for f in futures)
    text = out.getvalue()
    frames = [frame for frame in text.split("\r") if frame.strip()]
    assert frames[-1].startswith("[" + "#" * 40 + "]")
    assert "5,000 / 5,000 requests | 100%" in frames[-1]
    counts = [int(m.group(1).replace(",", "")) for m in re.finditer(r"\] ([\d,]+) /", text)]
    assert counts == sorted(counts)  # never goes back


def test_map_progress_writes_to_stderr_not_stdout(client, capsys):
    with ddb.Batcher(client, ddb.ModelSpec("affine-progress-map", load=build_affine)) as batcher:
        futures = batcher.map([np.full(2, 1.0)] * 300, progress=True)
        ddb.gather(futures, progress=True)
        ddb.progress(futures)  # a terminal: blocks until all finished
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "300 / 300 requests | 100%" in captured.err


def test_predict_progress_counts_rows(client, capsys):
    x = np.ones((BLOCK_ROWS + 5, 2))
    with ddb.Batcher(client, ddb.ModelSpec("affine-progress-predict", load=build_affine)) as batcher:
        assert batcher.predict(x, progress=True).shape == x.shape
    err = capsys.readouterr().err
    assert f"{BLOCK_ROWS + 5:,} / {BLOCK_ROWS + 5:,} rows | 100%" in err


def test_notebook_progress_bar_is_a_widget(client):
    pytest.importorskip("ipywidgets")
    with ddb.Batcher(client, ddb.ModelSpec("affine-progress-nb", load=build_affine)) as batcher:
        futures = batcher.map([np.full(2, 1.0)] * 500)
        bar = ddb.progress(futures, notebook=True)  # a notebook: returns at once
        assert bar.wait(timeout=60)
    progress_widget, label = bar._widget.children
    assert progress_widget.value == progress_widget.max == 500
    assert progress_widget.bar_style == "success"
    assert "500 / 500 requests" in label.value
