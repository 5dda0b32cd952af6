import pytest
from models import GATE

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]


@pytest.fixture
def gate():
    """The shared gate of ``models.build_gated``, closed for the test and opened after it."""
    GATE.clear()
    yield GATE
    GATE.set()
