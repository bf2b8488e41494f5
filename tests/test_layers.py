"""The tree is the architecture: an ast-based import graph of the repo's own modules, checked for
circles and for arrows that run back up the layers (function-level imports count too)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module may import its own layer and any lower one, never a higher one
LAYERS = [
    ("inference",),                                  # the core
    ("trainer.data", "trainer.workdir", "publish"),
    ("trainer.evaluation",),
    ("trainer.engine",),
    ("trainer.export",),
    ("trainer.bases",),
    ("trainer.multimodal",),
    ("trainer.commands", "trainer.__main__", "trainer"),
]
FRONT_ENDS = {"app", "web_demo"}                     # import only the core


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_modules() -> dict[str, Path]:
    files = [ROOT / "app.py", ROOT / "web_demo.py"]
    for pkg in ("inference", "trainer", "publish"):
        files += sorted((ROOT / pkg).rglob("*.py"))
    return {module_name(f): f for f in files}


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """The repo's own modules that `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module; `from mod import name` the module itself
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def layer_of(mod: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or mod.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return best[0] if best else None


def graph() -> dict[str, set[str]]:
    mods = own_modules()
    return {m: imports_of(p, mods) - {m} for m, p in mods.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep in deps:
            if dep in ("trainer", "inference", "publish"):       # a package's own __init__ is fine to import
                continue
            if mod in FRONT_ENDS:
                if not dep.startswith("inference"):
                    bad.append(f"{mod} -> {dep} (front ends import only the core)")
                continue
            if mod.startswith("publish") and not (dep.startswith("publish") or dep.startswith("inference")):
                bad.append(f"{mod} -> {dep} (publish imports only the core)")
                continue
            lm, ld = layer_of(mod), layer_of(dep)
            if ld is not None and lm is not None and ld > lm:
                bad.append(f"{mod} -> {dep} (runs up the layers)")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_runs_up_the_layers():
    assert violations(graph()) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_arrow():
    g = {"inference.engine": {"trainer.engine.train"}, "trainer.engine.train": {"inference.engine"},
         "app": {"trainer.bases.tiny"}, "publish.card": {"trainer.data.mix"}}
    assert cycles(g) == [["inference.engine", "trainer.engine.train"]]
    assert violations(g) == ["app -> trainer.bases.tiny (front ends import only the core)",
                             "inference.engine -> trainer.engine.train (runs up the layers)",
                             "publish.card -> trainer.data.mix (publish imports only the core)"]
