"""Print pip constraints that pin each runtime dependency of pyproject.toml to its lowest declared
version (``name>=X`` -> ``name==X``): what ci/lowest.sh installs the package with."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
    if m is None:
        sys.exit(f"lowest_constraints.py: no lower bound to pin in {requirement!r}")
    print(f"{m[1]}=={m[2]}")
