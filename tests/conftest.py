import dask

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]

# keep each worker's start-up reference benchmark short in tests (it runs in every test cluster)
dask.config.set({"dynbatch.benchmark.time-budget": 0.2})
