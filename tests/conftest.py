import os

import pytest
from models import GATE

# distributed's fixtures: `loop`, `cleanup`, ...
pytest_plugins = ["distributed.utils_test"]

# inductor starts a process-wide pool of compile threads, never shut down, when a C++ kernel misses
# its disk cache; gen_cluster would report those threads as leaked by whichever test compiled first.
# One compile thread means no pool. Set through the environment, before torch is imported: it is
# the default of every thread (a worker compiles in a thread of its own, and inductor's settings
# made in code hold only in the thread that made them) and of the child processes.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture
def gate():
    """The shared gate of ``models.build_gated``, closed for the test and opened after it."""
    GATE.clear()
    yield GATE
    GATE.set()
