import pytest
from gated import GATE

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]


@pytest.fixture
def gate():
    """The shared gate of ``gated.build_gated``, closed for the test and opened after it."""
    GATE.clear()
    yield GATE
    GATE.set()
