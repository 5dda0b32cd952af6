"""Print pip constraints that pin each runtime dependency of pyproject.toml to its lowest declared
version (``name>=X`` -> ``name==X``): what ci/lowest.sh installs the package with. The test extra's
packages built against NumPy without declaring it (pyarrow) would come at their newest, which may
refuse the lowest NumPy at import: they, and pandas, are held at their lower bounds too."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: test-extra packages held at their lower bounds with the runtime dependencies
WITH_NUMPY = ("pandas", "pyarrow")

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
extra = [r for r in project["optional-dependencies"]["test"] if re.split(r"[<>=\[ ]", r, maxsplit=1)[0] in WITH_NUMPY]
for requirement in [*project["dependencies"], *extra]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
    if m is None:
        sys.exit(f"lowest_constraints.py: no lower bound to pin in {requirement!r}")
    print(f"{m[1]}=={m[2]}")
