import pytest

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]
