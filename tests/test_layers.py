"""palikit's layers, checked on every import statement of src/palikit (function-local and TYPE_CHECKING
ones too). A unit is a subpackage (`engine`, `train`, ...) or a top-level module (`api`, `config`, ...).
A unit may import units of LOWER layers only: never a higher layer, never a sibling of its own layer.

    foundation   config, runtime, fileio, assets, tokenizer, preprocess, video   (import nothing of palikit)
    model        model                          the PyTorch PaliGemma
    core         weights, engine, tasks, onnx   checkpoints in and out / generation over token ids / prompts,
                                                parsing, results / ONNX graphs out (independent of each other)
    api          api, demo, datafiles           the PaliGemma object; the shapes generators `palikit demo` draws;
                                                the JSONL / COCO readers (they apply the task layer's label rule)
    apps         eval, serve, testing           evaluation, the HTTP server, test and benchmark models
    apps+        train, distributed             training (its monitor scores with eval), Ray (serves the app)
    bench        bench                          benchmarks: above everything they measure
    cli          cli                            the typer commands, over everything
    entry        __main__                       `python -m palikit`

Upward pairs allowed: those in `EXCEPTIONS` (named, with the reason; none today). The root `palikit/__init__.py`
names its exports as strings (lazy), so it imports nothing; `lab/` (the demo-model factory, outside the
package) imports palikit and is never imported by it. A separate test keeps the module graph free of
cycles. A package importing a sibling module through itself (`from . import x`) is not an edge.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import palikit

ROOT = Path(palikit.__file__).resolve().parent

LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"config", "runtime", "fileio", "assets", "tokenizer", "preprocess", "video"}),
    ("model", {"model"}),
    ("core", {"weights", "engine", "tasks", "onnx"}),
    ("api", {"api", "demo", "datafiles"}),
    ("apps", {"eval", "serve", "testing"}),
    ("apps+", {"train", "distributed"}),
    ("bench", {"bench"}),
    ("cli", {"cli"}),
    ("entry", {"__main__"}),
]
# (importer, imported): why. Each must still occur (a fixed one is removed from here).
EXCEPTIONS: dict[tuple[str, str], str] = {}  # none: every import goes down (the last, tasks -> engine, went in issue 31)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods) -> list[tuple[str, int]]:
    """(imported palikit module, line) for every import statement of module `name`, anywhere in it."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        deps: set[str] = set()
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            pkg = (base[:len(base) - node.level + 1] if node.level else []) + ([node.module] if node.module else [])
            prefix = ".".join(pkg)
            deps |= {prefix} | {f"{prefix}.{a.name}" for a in node.names}
        out += [(d, node.lineno) for d in deps if d in mods and d != name and not name.startswith(d + ".")]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {d for d, _ in _imports(name, path, mods)} for name, path in mods.items()}


def unit(module: str) -> str | None:
    """`palikit.engine.slots` -> "engine", `palikit.api` -> "api", the root `palikit` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def rank(u: str) -> int:
    return next(i for i, (_, units) in enumerate(LAYERS) if u in units)


def layer_violations() -> dict[tuple[str, str], list[str]]:
    """{(importer unit, imported unit): ["file:line", ...]} for every import that does not go down."""
    mods = _modules()
    out: dict[tuple[str, str], list[str]] = {}
    for name, path in mods.items():
        src = unit(name)
        for dep, line in _imports(name, path, mods):
            dst = unit(dep)
            if src is None or dst is None or src == dst or rank(src) > rank(dst):
                continue
            out.setdefault((src, dst), []).append(f"{path.relative_to(ROOT.parent)}:{line}")
    return out


def test_every_unit_has_a_layer():
    units = {unit(m) for m in _modules()} - {None}
    placed = [u for _, us in LAYERS for u in us]
    assert len(placed) == len(set(placed)), "a unit is in two layers"
    assert units - set(placed) == set(), "place the new unit in LAYERS (and the docstring)"
    assert set(placed) - units == set(), "LAYERS names a unit that no longer exists"


def test_imports_only_go_down_the_layers():
    found = layer_violations()
    unexpected = {pair: where for pair, where in found.items() if pair not in EXCEPTIONS}
    assert not unexpected, "imports that go up or sideways: " + "; ".join(
        f"{a} -> {b} ({', '.join(w[:3])})" for (a, b), w in sorted(unexpected.items()))
    stale = set(EXCEPTIONS) - set(found)
    assert not stale, f"these exceptions are fixed: remove them from EXCEPTIONS: {sorted(stale)}"
    assert len(EXCEPTIONS) <= 1


def test_the_layer_check_sees_function_local_imports(tmp_path, monkeypatch):
    """A function-local import of a higher layer is caught like a top-level one."""
    pkg = tmp_path / "palikit"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "slots.py").write_text("def f():\n    from ..api import PaliGemma\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert layer_violations() == {("engine", "api"): ["palikit/engine/slots.py:2"]}


def test_palikit_never_imports_lab():
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "lab" or n.startswith("lab.") for n in names), f"{path} imports lab"


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
