"""The decisions, as pure logic: no dask, distributed, torch or other GPU library is imported here
(``tests/test_layout.py`` checks it), so every rule is unit-tested with fakes for time and memory.

- :mod:`.requests`: request futures and the client's priority queue
- :mod:`.blocks`: many rows of one array as one request (``Batcher.predict``), cut where shipments are full
- :mod:`.rows`: samples as arrays, stacking for the wire, splitting outputs back into rows
- :mod:`.formation`: the model server's queue and how device batches are formed from it
- :mod:`.estimate`: running averages per batch size, used by everything that learns from batches
- :mod:`.controller`: batch size from latency and throughput, gated by a Mann-Kendall trend test
- :mod:`.pacing`: when a partial batch leaves for a busy device
- :mod:`.placement`: the workload figure and which workers get the next batches
- :mod:`.memory`: memory readings, caps from free memory, reservations
- :mod:`.profile`: a model's memory per batch, fitted from measured peaks and out-of-memory errors
- :mod:`.oom`: out-of-memory errors recognised, a batch split and retried
- :mod:`.trend`, :mod:`.throughput`: the controller's trend test and its throughput table
- :mod:`.ladder`: the bucket and shape ladders batches are formed on
- :mod:`.watchdog`: when a running device batch counts as stuck
- :mod:`.quarantine`: requests lost with their worker, retried in halves until the culprit is alone
"""
