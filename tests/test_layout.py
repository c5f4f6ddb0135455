"""The shape of the package (issue 25): a lean core that never imports an application, no import cycles, no
source file over 450 lines without a stated reason.

What "application" means here: the subpackages and modules that use the core's public API to do one job and
are loaded only on demand -- the demo (``xmodal.demo``: Shapes data, demo model, ``xmodal demo``), the
recommender (``xmodal.recommend``), the service and its client (``xmodal.serve``, ``xmodal.client``), the
benchmark harness (``xmodal.bench``) and the command line (``xmodal.cli``, ``xmodal.__main__``), plus the web
stack the service needs (FastAPI, uvicorn, starlette). Everything else under ``python/xmodal`` is the core.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from typing import Dict, List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "python", "xmodal")

#: modules (and, with their submodules, packages) that are applications
APPLICATIONS = ("xmodal.demo", "xmodal.recommend", "xmodal.serve", "xmodal.client", "xmodal.bench", "xmodal.cli",
                "xmodal.__main__")
#: third-party modules only an application may load
APPLICATION_DEPENDENCIES = ("fastapi", "uvicorn", "starlette", "ray")

MAX_LINES = 450
REASON = "Longer than 450 lines because"


def _is_application(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPLICATIONS)


def test_import_xmodal_loads_no_application():
    code = "import sys, xmodal; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    loaded = [m for m in out if _is_application(m)
              or any(m == d or m.startswith(d + ".") for d in APPLICATION_DEPENDENCIES)]
    assert loaded == [], f"import xmodal loaded application modules: {loaded}"


def test_applications_stay_reachable_lazily():
    code = ("import sys, xmodal\n"
            "for name in ('recommend', 'demo', 'bench'):\n"
            "    assert getattr(xmodal, name).__name__ == 'xmodal.' + name\n"
            "    assert 'xmodal.' + name in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the import graph ---------------------------------------------------------------------------------------

def _modules() -> Dict[str, str]:
    """Every module under python/xmodal: dotted name -> file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    found["xmodal._C"] = ""  # the compiled extension: imports nothing of xmodal
    return found


def _imports(name: str, path: str, modules: Dict[str, str]) -> Set[str]:
    """The xmodal modules ``name`` imports, at module level or inside functions. ``from a import b`` counts as an
    import of ``a.b`` where that is a module, else of ``a``; importing ``a.b`` also runs ``a``'s ``__init__``,
    but that edge is left out (a package's ``__init__`` importing its submodules is not a cycle)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    out: Set[str] = set()
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                targets.append(sub if sub in modules else base_name)
        else:
            continue
        for target in targets:
            # the deepest xmodal module the dotted name names
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) if path else set() for name, path in modules.items()}


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    colour: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "xmodal.index.base" in graph["xmodal.index.flat"]
    assert "xmodal.ops" in graph["xmodal"]
    # a function-level import counts (cli imports the demo inside a function)
    assert "xmodal.demo" in graph["xmodal.cli"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_imports_no_application():
    # Deprecation aliases (xmodal._deprecated) name their new, application home as a string and import it only
    # when an old name is used, so they are no edge of this graph: old places keep working for one release
    # without the core depending on the demo.
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() if not _is_application(m)
                    for t in targets if _is_application(t))
    assert upward == [], f"core modules import applications: {upward}"


def test_deprecated_names_still_work_and_say_where_they_went():
    from xmodal import _deprecated

    assert _deprecated.MOVED, "no deprecation aliases registered"
    for old_module, names in _deprecated.MOVED.items():
        module = __import__(old_module, fromlist=["_"])
        for name, target in names.items():
            new_module, new_name = _deprecated.new_place(target, name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = getattr(module, name)
            new = __import__(new_module, fromlist=["_"])
            assert value is getattr(new, new_name), f"{old_module}.{name}"
            messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
            assert messages and f"{new_module}.{new_name}" in messages[0], (old_module, name, messages)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        __import__("xmodal.data", fromlist=["_"]).no_such_name


# --- file sizes ---------------------------------------------------------------------------------------------

def _sources() -> List[str]:
    out = []
    for top, exts in (("python", (".py",)), ("tests", (".py",)), ("benchmarks", (".py",)), ("scripts", (".py",)),
                      ("csrc", (".cpp", ".cu", ".h", ".cuh"))):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            out += [os.path.join(folder, f) for f in files if f.endswith(exts)]
    return sorted(out)


def test_no_source_file_over_450_lines_without_a_reason():
    long = []
    for path in _sources():
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
        if len(lines) > MAX_LINES and not any(REASON in line for line in lines[:5]):
            long.append(f"{os.path.relpath(path, ROOT)} ({len(lines)} lines)")
    assert long == [], (f"over {MAX_LINES} lines, with no '{REASON} ...' line in the first 5: split by concept, or "
                        f"say why not: {long}")
