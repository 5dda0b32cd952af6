import pytest
from models import GATE

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]

try:  # inductor starts a process-wide pool of compile threads, never shut down, when a C++ kernel
    # misses its disk cache; gen_cluster would report those threads as leaked by whichever test
    # compiled first, so in-process compiles here run on the calling thread
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1
except ImportError:
    pass


@pytest.fixture
def gate():
    """The shared gate of ``models.build_gated``, closed for the test and opened after it."""
    GATE.clear()
    yield GATE
    GATE.set()
