"""The package's shape: subpackages by layer, imports flowing one way, no cycles, no private names
imported across modules, and the reference math imported by tests only.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts as
much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mgrpo_fast"

# Top to bottom: a subpackage may import from its own layer and the layers below it, never above.
# `mgrpo_fast.kernels` (the top-level kernels/ folder) is the bottom layer.
LAYERS = [
    {"cli"},
    {"integrations", "tools"},
    {"rl"},
    {"config"},
    {"engines"},
    {"models"},
    {"packing"},
    {"data"},
    {"ops"},
    {"kernels"},
]
TOP_LEVEL_MODULES = {"__init__", "reference", "train", "demo", "compare"}  # the shims and the spec


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["mgrpo_fast", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.update({module_name(p): p for p in (ROOT / "kernels").rglob("*.py")})
    return files


MODULES = source_files()


def imports_of(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import of an ``mgrpo_fast`` module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("mgrpo_fast"):
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{mod}.{n}" not in MODULES]
                if not names:
                    continue
            out.append((mod, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("mgrpo_fast")]
    return out


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 3 and not (len(parts) == 2 and parts[1] in {s for layer in LAYERS for s in layer}):
        return None  # top-level modules (the public __init__, reference, shims) sit outside the layers
    sub = parts[1]
    return next((i for i, layer in enumerate(LAYERS) if sub in layer), None)


GRAPH = {name: sorted({m for m, _, _ in imports_of(name, p) if m in MODULES}) for name, p in MODULES.items()}


def test_every_subpackage_has_a_layer():
    subs = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subs <= {s for layer in LAYERS for s in layer}, subs


def test_few_modules_directly_in_the_package():
    direct = {p.stem for p in PACKAGE.glob("*.py")}
    assert direct == TOP_LEVEL_MODULES, direct


def test_no_import_cycle():
    # Tarjan's strongly connected components over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in GRAPH[v]:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_down_the_layers(name):
    mine = layer_of(name)
    if mine is None:
        return
    for mod, _, line in imports_of(name, MODULES[name]):
        theirs = layer_of(mod)
        assert theirs is None or theirs >= mine, (
            f"{MODULES[name].relative_to(ROOT)}:{line} imports {mod}, a layer above {name.split('.')[1]}"
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_modules(name):
    for mod, names, line in imports_of(name, MODULES[name]):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        where = f"{MODULES[name].relative_to(ROOT)}:{line}"
        assert mod == name or not private, f"{where} imports {private} from {mod}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_reference_is_imported_by_tests_only(name):
    for mod, names, line in imports_of(name, MODULES[name]):
        assert mod != "mgrpo_fast.reference" and "reference" not in (
            names if mod == "mgrpo_fast" else []
        ), f"{MODULES[name].relative_to(ROOT)}:{line}: product code imports the executable spec"
