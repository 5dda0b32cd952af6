"""The package's layout holds: imports run one way, the pure core imports no dask or GPU library, and
private APIs of other projects are used only where ``dask_dynbatch/_compat.py`` lists them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from dask_dynbatch import _compat

PACKAGE = Path(__file__).resolve().parents[1] / "dask_dynbatch"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def module_level_imports(name: str, tree: ast.Module) -> set[str]:
    """Package modules ``name`` imports at import time (not inside functions)."""
    package = name if (PACKAGE.parent / (name.replace(".", "/") + "/__init__.py")).exists() else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports nothing at run time
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dask_dynbatch"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dask_dynbatch"))
    mods = modules_cache()
    return {t for t in found if t in mods and t != name}


_MODULES: dict[str, ast.Module] = {}


def modules_cache() -> dict[str, ast.Module]:
    if not _MODULES:
        _MODULES.update(modules())
    return _MODULES


def test_imports_run_one_way_and_form_no_cycle():
    mods = modules_cache()
    graph = {name: module_level_imports(name, tree) for name, tree in mods.items()}
    half = {"core": "core", "client": "client", "worker": "worker", "scheduler": "scheduler"}

    def layer(name: str) -> str:
        parts = name.split(".")
        return half.get(parts[1], "top") if len(parts) > 1 else "top"

    allowed = {
        "core": {"core"},  # and dask_dynbatch.errors, below
        "client": {"core", "client", "top"},
        "worker": {"core", "worker", "top"},
        "scheduler": {"core", "scheduler", "top", "worker"},  # it installs the worker half
    }
    for name, imports in graph.items():
        for target in imports:
            if layer(name) == "core" and target == "dask_dynbatch.errors":
                continue
            if target in ("dask_dynbatch", "dask_dynbatch.config"):
                continue
            assert layer(name) not in allowed or layer(target) in allowed[layer(name)], f"{name} imports {target}"
    # no cycle among module-level imports (a package imports its modules' parents implicitly)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_core_imports_no_dask_and_no_gpu_library():
    code = (
        "import sys\n"
        "import dask_dynbatch.core.controller, dask_dynbatch.core.estimate, dask_dynbatch.core.formation\n"
        "import dask_dynbatch.core.ladder, dask_dynbatch.core.memory, dask_dynbatch.core.pacing\n"
        "import dask_dynbatch.core.placement, dask_dynbatch.core.requests, dask_dynbatch.core.rows\n"
        "import dask_dynbatch.core as core, pkgutil\n"
        "for info in pkgutil.iter_modules(core.__path__):\n"
        "    __import__('dask_dynbatch.core.' + info.name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('dask', 'distributed', 'torch', 'cupy', 'pynvml', 'psutil', 'bokeh', 'tornado'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_libraries_are_imported_only_when_a_model_needs_them():
    code = (
        "import sys\n"
        "import dask_dynbatch as ddb\n"
        "from dask_dynbatch.worker import telemetry, plugin, server, model\n"
        "from dask_dynbatch.client import batcher\n"
        "from dask_dynbatch.scheduler import plugin as splugin\n"
        "telemetry.device_telemetry(telemetry.detect_memory_source('cpu', limit_fraction=1.0))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy', 'pynvml', 'bokeh'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


#: where a private name of another project may be used, besides _compat.py itself
PRIVATE_ELSEWHERE = {
    # RequestFuture implements concurrent.futures.Future's protocol (see _compat.PRIVATE_USES)
    "dask_dynbatch.core.requests": {"_state", "_condition", "_waiters", "_done_callbacks", "_invoke_callbacks",
                                    "_base", "_result", "_exception"},
}
EXTERNAL = ("distributed", "bokeh", "tornado", "torch", "cupy", "dask", "concurrent")


def test_private_apis_of_other_projects_only_where_listed():
    """No module but _compat reaches into a private name of distributed, bokeh, torch or CPython,
    except the CPython future protocol that RequestFuture implements."""
    assert len(_compat.PRIVATE_USES) >= 3 and all(reason for reason in _compat.PRIVATE_USES.values())
    for name, tree in modules_cache().items():
        if name == "dask_dynbatch._compat":
            continue
        external_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in EXTERNAL:
                assert not any(part.startswith("_") for part in node.module.split(".")), f"{name}: from {node.module}"
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{name}: from {node.module} import {alias.name}"
                    external_names.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in EXTERNAL:
                        assert not any(p.startswith("_") for p in alias.name.split(".")), f"{name}: import {alias.name}"
                        external_names.add((alias.asname or alias.name).split(".")[0])
        allowed = PRIVATE_ELSEWHERE.get(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in external_names:
                    assert node.attr in allowed, f"{name} uses {ast.unparse(node)}"
