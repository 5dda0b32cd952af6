"""A progress bar over request futures: text on stderr in a terminal, a widget in a notebook.

Dask's own ``distributed.progress`` follows Dask Futures through the scheduler; request futures
never become Dask tasks, so this bar counts them itself. It never adds a callback to a future (a
million callbacks would cost more than the requests): a background thread advances an index over
the futures in submission order, about in the order they finish, and counts the finished futures in
a window ahead of it, so that every tick costs at most :data:`LOOKAHEAD` checks.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, TextIO

#: finished futures are also counted this far past the first unfinished one
LOOKAHEAD = 10_000


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where the bar is a widget)."""
    from distributed.utils import is_kernel

    return bool(is_kernel())


class ProgressBar:
    """Shows how many of ``futures`` have finished, until all have.

    Parameters
    ----------
    futures
        Request futures (any :class:`concurrent.futures.Future`), in submission order; the list may
        still grow while the bar runs when ``total`` says how long it will be.
    notebook
        A widget (``True``), text (``False``), or a widget when running in a Jupyter kernel and
        ``ipywidgets`` is installed (``None``, the default).
    total
        How many futures there will be (default: ``len(futures)``), or rows with ``sizes``.
    sizes
        How many rows each future stands for (a block of :meth:`Batcher.predict
        <dask_dynbatch.Batcher.predict>`): the bar counts rows, not futures.
    interval
        Seconds between updates.
    file
        Where the text bar is written (default ``sys.stderr``, so that it stays out of the
        program's own output).

    Examples
    --------
    >>> futures = batcher.map(samples)          # doctest: +SKIP
    >>> bar = ProgressBar(futures); bar.wait()  # doctest: +SKIP
    """

    def __init__(self, futures: Sequence[Future], *, total: int | None = None, notebook: bool | None = None,
                 interval: float = 0.1, file: TextIO | None = None, label: str = "requests",
                 sizes: Sequence[int] | None = None):
        self.futures = futures
        self.sizes = sizes
        self.total = (len(futures) if sizes is None else sum(sizes)) if total is None else total
        self.interval = interval
        self.label = label
        self._file = file
        self._index = 0  # every future before it has finished
        self._counted = 0  # what the futures before the index stand for
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._widget: Any = None
        if notebook is None:
            notebook = in_notebook()
        if notebook:
            self._widget = self._make_widget()
        self._draw(self.count())
        self._thread = threading.Thread(target=self._run, name="dynbatch-progress", daemon=True)
        self._thread.start()

    def count(self) -> int:
        """Finished futures, or their rows with ``sizes`` (exact once all have finished)."""
        futures, sizes, i = self.futures, self.sizes, self._index
        n = len(futures)  # those submitted so far
        while i < n and futures[i].done():
            self._counted += 1 if sizes is None else sizes[i]
            i += 1
        self._index = i
        ahead = range(i + 1, min(n, i + 1 + LOOKAHEAD))
        return self._counted + sum(1 if sizes is None else sizes[j] for j in ahead if futures[j].done())

    @property
    def done(self) -> bool:
        return self.count() >= self.total

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every future finished (and the bar shows it); ``False`` on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop updating (the futures are not touched)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            count = self.count()
            self._draw(count)
            if count >= self.total:
                break
        if self._widget is None:
            print(file=self._out(), flush=True)  # leave the finished bar on its own line

    def _out(self) -> TextIO:
        return self._file if self._file is not None else sys.stderr

    def _text(self, count: int) -> str:
        fraction = count / self.total if self.total else 1.0
        elapsed = time.monotonic() - self._start
        return f"{count:,} / {self.total:,} {self.label} | {fraction:4.0%} | {elapsed:6.1f} s"

    def _draw(self, count: int) -> None:
        if self._widget is not None:
            bar, label = self._widget.children
            bar.value = count
            label.value = self._text(count)
            if count >= self.total:
                bar.bar_style = "success"
            return
        width = 40
        filled = int(width * count / self.total) if self.total else width
        self._out().write(f"\r[{'#' * filled}{' ' * (width - filled)}] {self._text(count)}")
        self._out().flush()

    def _make_widget(self) -> Any:
        try:
            import ipywidgets
            from IPython.display import display
        except ImportError:  # no widgets: the text bar still works
            return None
        widget = ipywidgets.HBox([ipywidgets.IntProgress(value=0, min=0, max=max(1, self.total)),
                                  ipywidgets.HTML(value="")])
        display(widget)
        return widget


def progress(futures: Sequence[Future], *, notebook: bool | None = None, wait: bool | None = None) -> ProgressBar:
    """Show a progress bar over request futures.

    Like ``distributed.progress``: in a terminal it blocks until every future finished (unless
    ``wait=False``), in a notebook it shows a widget and returns at once.
    """
    if notebook is None:
        notebook = in_notebook()
    bar = ProgressBar(futures, notebook=notebook)
    if wait if wait is not None else not notebook:
        bar.wait()
    return bar
