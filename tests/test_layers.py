"""The layering is checked, not hoped for.

- `lint-imports` checks the contracts of pyproject.toml's [tool.importlinter] (the layers
  cli > clients > server > model > kernels; inside model training > engine > checkpoint > network,
  the synthetic world apart; no cycles between the children of any package);
- the import graph (grimp, what import-linter builds on) has no cycle at all, between any two
  modules: acyclic_siblings does not see a package whose __init__ and a child import each other;
- the CPU path never imports triton.
Lazy imports inside functions count like the others: grimp reads every import statement.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("casa_live.cli", "casa_live.clients", "casa_live.server", "casa_live.model", "casa_live.kernels")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if run.returncode != 0:
        pytest.fail(f"lint-imports failed:\n{run.stdout}\n{run.stderr}", pytrace=False)


def import_edges(graph: grimp.ImportGraph) -> dict[str, list[str]]:
    return {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in graph.modules}


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):  # Tarjan's algorithm, iterative
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def test_cycles_finds_a_cycle_through_a_package_init() -> None:
    edges = {"a": ["a.b"], "a.b": ["a.c"], "a.c": ["a"], "d": ["a", "d"], "e": ["a", "d"]}
    assert sorted(cycles(edges)) == [["a", "a.b", "a.c"], ["d"]]
    assert cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert "casa_live.model.checkpoint.load" in graph.modules  # the graph is the installed package
    found = cycles(import_edges(graph))
    report = []
    for component in found:
        members = set(component)
        report.append("cycle among: " + ", ".join(component))
        for m in component:
            for imported in sorted(graph.find_modules_directly_imported_by(m) & members):
                for d in graph.get_import_details(importer=m, imported=imported):
                    report.append(f"  {m}:{d['line_number']} imports {imported}: {d['line_contents']}")
    if found:
        pytest.fail("\n".join(report), pytrace=False)


def test_the_cpu_path_never_imports_triton() -> None:
    probe = """
import sys
import torch
from casa_live.kernels import dispatch, reference
import casa_live.model.decode, casa_live.model.vlm
q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
dispatch.prefix_causal_attention(q, None, None, None, k, k, torch.zeros(1, dtype=torch.long), 0.3)
dispatch.rms_norm(q, torch.ones(8), 1e-6)
dispatch.apply_rope(q, k, torch.ones(1, 3, 8), torch.zeros(1, 3, 8))
assert dispatch.backend_for(q) == "torch"
print(sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "casa_live.kernels."))))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0] == "['casa_live.kernels.dispatch', 'casa_live.kernels.reference']"
