"""The package's layout by stage (docs/layout.md), read from the source (no import): ``ls hca/`` is the
method's stages; imports only point down the layers; no import circle, not even through a lazy
import inside a function; the math imports torch only; nothing inside hca names a path from before
the layout (hca/_legacy_paths.py keeps those working for users, tested in test_legacy_paths.py)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from hca._legacy_paths import MOVED

ROOT = Path(__file__).resolve().parents[1] / "hca"

# Lowest first. A package imports only packages of lower layers; packages of one layer are peers and
# import nothing of each other. Adding a package or a top-level module means adding it here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hca.credit", "hca.steps"),                 # the method's math and its unit of credit: torch only
    ("hca.data", "hca.verify", "hca.runtime"),   # problems and records; answer checking; a run's plumbing
    ("hca.models",),                             # loading, GGUF import, LoRA, identity
    ("hca.rollout",),                            # the sampling engines behind one protocol
    ("hca.collection",),                         # stage 1: prover-labeled trajectories
    ("hca.prm", "hca.rl"),                       # stage 2: the progress PRM; stage 3: RL (peers: the RL
                                                 # step scores through the StepScorer protocol, named in YAML)
    ("hca.evaluation",),                         # stage 4: policies, PRMs, PRM-guided search
    ("hca.datamodules",),                        # Lightning: the data of every stage
    ("hca.modules",),                            # Lightning: the modules of every stage
    ("hca.workflows",),                          # what a user runs: CLI, pipeline, recipes, experiment, report
)
LAYER = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
TOP_LEVEL = {"__init__.py", "_legacy_paths.py", "credit.py", "steps.py"} | {p.split(".")[1] for p in LAYER
                                                                             if (ROOT / p.split(".")[1]).is_dir()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
IMPORTS = {m: [n for n in ast.walk(ast.parse(p.read_text(), str(p))) if isinstance(n, (ast.Import, ast.ImportFrom))]
           for m, p in MODULES.items()}  # every import statement of every module, at the top or in a function


def _imports(name: str) -> set[str]:
    """Every module of the package that ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    out: set[str] = set()
    for node in IMPORTS[name]:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


def _external(name: str) -> set[str]:
    tops = set()
    for node in IMPORTS[name]:
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif not node.level:
            tops.add((node.module or "").split(".")[0])
    return tops - {"__future__"}


def _package(name: str) -> str:
    """``hca.rl.batch`` -> ``hca.rl``; the top-level modules are their own package."""
    return ".".join(name.split(".")[:2])


GRAPH = {m: _imports(m) for m in MODULES}


def test_ls_hca_reads_as_the_stages():
    assert {p.name for p in ROOT.iterdir() if p.name != "__pycache__"} == TOP_LEVEL
    for pkg in LAYER:  # every package and module of the layout is a layer's, and every layer's exists
        assert any(m == pkg or m.startswith(pkg + ".") for m in MODULES), pkg
    for m in MODULES:
        assert m in ("hca", "hca._legacy_paths") or _package(m) in LAYER, f"{m}: in no layer of LAYERS"


def test_imports_point_down_the_layers():
    wrong = []
    for m, deps in GRAPH.items():
        if m in ("hca", "hca._legacy_paths"):
            continue
        for d in deps:
            a, b = _package(m), _package(d)
            if b in ("hca", "hca._legacy_paths") or a == b:
                continue
            if LAYER[b] >= LAYER[a]:
                wrong.append(f"{m} -> {d} ({a} is layer {LAYER[a]}, {b} layer {LAYER[b]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    """Tarjan's strongly connected components over module imports, lazy ones included."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
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
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("name", ["hca.credit", "hca.steps"])
def test_the_math_imports_torch_only(name):
    assert _external(name) - set(sys.stdlib_module_names) == {"torch"}
    assert not GRAPH[name], f"{name} imports {GRAPH[name]}"


def test_nothing_inside_hca_names_an_old_path():
    old = {f"hca.{o}" for o in MOVED}
    found = []
    for m, nodes in IMPORTS.items():
        if m == "hca._legacy_paths":
            continue
        for node in nodes:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] + [f"{node.module}.{a.name}" for a in node.names] if not node.level else [])
            found += [f"{m}: {n}" for n in names if n in old]
    assert not found, found


def test_the_layering_check_catches_a_wrong_arrow(monkeypatch):
    """The checks above can fail: an upward import and a circle, planted in a copy of the graph."""
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["hca.rl.batch"].add("hca.workflows.pipeline")
    planted["hca.data.problems"].add("hca.data.prompts")  # prompts imports problems: a circle
    monkeypatch.setattr(sys.modules[__name__], "GRAPH", planted)
    with pytest.raises(AssertionError, match="hca.rl.batch -> hca.workflows.pipeline"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()
