"""The package graph a newcomer relies on: subpackages import each other in one direction
(no cycles), and what runs inside a job's image (worker/, rundir/, host/) needs nothing
but the standard library and vLLM. Read from the source's syntax trees, function-level
imports included (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "hpc_infer"
IN_JOBS = ("worker", "rundir", "host")  # imported inside the cluster's vLLM image
# what vLLM's own install brings into that image (the worker's engines use them directly)
READERS = ("hpc_infer.io.records", "hpc_infer.io.openai_batch")  # a chunk's lines -> records, in the job
ENGINE_DEPS = {"vllm", "torch", "transformers", "numpy", "psutil", "openai", "httpx"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, tuple[set[str], set[str]]]:
    """module -> (our modules it imports, other top-level packages it imports)."""
    out = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        ours, others = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                (ours if t.split(".")[0] == "hpc_infer" else others).add(
                    t if t.startswith("hpc_infer") else t.split(".")[0]
                )
        out[name] = (ours, others)
    return out


def subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_subpackages_import_each_other_in_one_direction():
    graph: dict[str, set[str]] = {}
    for name, (ours, _) in imports(modules()).items():
        for target in ours:
            a, b = subpackage(name), subpackage(target)
            if a != b and b != "hpc_infer":
                graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(
            n == goal or (n not in seen and (seen.add(n) or reaches(n, goal, seen))) for n in graph.get(start, ())
        )

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a, set())})
    assert not cycles, f"subpackages that import each other (directly or around a loop): {cycles}"


def test_what_runs_in_a_job_needs_only_the_stdlib_and_vllm():
    graph = imports(modules())
    stdlib = set(sys.stdlib_module_names)
    allowed_ours = {"hpc_infer.errors", *READERS, *(f"hpc_infer.{p}" for p in IN_JOBS)}
    problems = []
    for name, (ours, others) in graph.items():
        if subpackage(name) not in IN_JOBS:
            continue
        problems += [
            f"{name} imports {t}" for t in ours if not any(t == a or t.startswith(a + ".") for a in allowed_ours)
        ]
        problems += [f"{name} imports {t}" for t in others if t not in stdlib and t not in ENGINE_DEPS]
    for name in ("hpc_infer.errors", "hpc_infer.io", *READERS):  # what they import in turn
        problems += [f"{name} imports {t}" for t in graph[name][0] if t not in ("hpc_infer.errors", *READERS)]
        problems += [f"{name} imports {t}" for t in graph[name][1] if t not in stdlib]
    assert not problems, problems
