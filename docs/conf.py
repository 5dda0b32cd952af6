"""Sphinx configuration of the API reference: ``python -m sphinx -W docs docs/_build`` (CI builds it
with warnings as errors)."""

import dask_dynbatch

project = "dask-dynbatch"
release = version = dask_dynbatch.__version__
extensions = ["sphinx.ext.autodoc", "numpydoc"]
# the Markdown notes beside this file are read on GitHub, not built here
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc parameter lists say it
numpydoc_show_class_members = False
numpydoc_validation_checks: set[str] = set()
nitpicky = False
html_theme = "alabaster"
