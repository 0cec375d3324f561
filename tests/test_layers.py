"""The import rule (README "Architecture"): layers import downward only, and no module imports
itself back through others. Read from the source with ``ast``, function-level imports included,
so a lazy import cannot hide a cycle.

    core (0)  <  steps (1)  <  tracking (2)  <  top: pipeline, config, summary, search, ... and
                                                 the Hydra plugins (3)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (("robustsweep.core", 0), ("robustsweep.steps", 1), ("robustsweep.tracking", 2))
TOP = 3


def layer(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    return TOP


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, str]:
    """Every module of the package and its Hydra plugins: name -> source."""
    files = [*(ROOT / "robustsweep").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
    return {module_name(p): p.read_text() for p in files}


def imports(name: str, source: str, known: set[str]) -> set[str]:
    """The modules of ours that ``name`` imports (a ``from pkg import mod`` counts as pkg.mod)."""
    is_pkg = any(k.startswith(name + ".") for k in known)
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ._impl import y
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def graph(srcs: dict[str, str]) -> dict[str, set[str]]:
    known = set(srcs)
    return {m: imports(m, s, known) for m, s in srcs.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    """Upward imports, then cycles (each as a path a -> b -> ... -> a)."""
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, deps in sorted(g.items()) for b in sorted(deps) if layer(b) > layer(a)]
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                bad.append("cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return bad


def test_layers_import_downward_only_and_without_cycles():
    g = graph(sources())
    assert len(g) > 25 and "robustsweep.pipeline" in g and "robustsweep.core.errors" in g
    assert violations(g) == []


def test_the_checker_catches_an_upward_import_and_a_cycle():
    # The same checker on a copy of the real sources with two imports added by hand, so this
    # test fails if the checker ever stops seeing them.
    srcs = sources()
    srcs["robustsweep.core.params"] += "\nfrom robustsweep.steps import data\n"
    srcs["robustsweep.steps.data"] += "\ndef f():\n    from robustsweep.steps.attacks import FGSM\n"
    found = violations(graph(srcs))
    assert "robustsweep.core.params (layer 0) imports robustsweep.steps.data (layer 1)" in found
    assert any(v.startswith("cycle:") and "robustsweep.steps.attacks" in v
               and "robustsweep.steps.data" in v for v in found), found


def test_relative_imports_in_the_plugins_are_resolved():
    g = graph(sources())
    assert "hydra_plugins.robustsweep_optuna._impl" in g["hydra_plugins.robustsweep_optuna.optuna_sweeper"]


def defined_names(source: str) -> set[str] | None:
    """Top-level names a module defines (None: it has a module ``__getattr__`` without a ``_WHERE``
    table, so any name may exist)."""
    tree = ast.parse(source)
    names: set[str] = set()
    lazy = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            if node.name == "__getattr__":
                lazy = lazy or set()
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_WHERE" for t in node.targets)
                    and isinstance(node.value, ast.Dict)):
                lazy = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if lazy is not None and not lazy:
        return None
    return names | (lazy or set())


def test_every_import_of_ours_names_something_that_exists():
    # ``from robustsweep import sweep`` after sweep.py moved would pass the layer check (it names
    # the package) and fail only when that line runs; here it fails at once.
    srcs = sources()
    missing = []
    for name, source in sorted(srcs.items()):
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith(
                    ("robustsweep", "hydra_plugins.robustsweep")):
                continue
            if node.module not in srcs:
                missing.append(f"{name}: no module {node.module}")
                continue
            have = defined_names(srcs[node.module])
            for a in node.names:
                if f"{node.module}.{a.name}" not in srcs and have is not None and a.name not in have:
                    missing.append(f"{name}: {node.module} has no {a.name}")
    assert missing == []
