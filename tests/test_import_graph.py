"""The import graph (issue 9, core redesign): the serving processes never
import the benchmark harness, torch or transformers, and no module of the
project imports itself back through others (no cycles, lazy imports inside
functions included: they are cycles that only bite later)."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "gateway", "inference", "cache")
NEVER_IN_SERVING = ("gateway.bench", "torch", "transformers")  # packages, with everything under them


def _forbidden(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in NEVER_IN_SERVING)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its code)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        # `from a.b import c` imports module a.b.c if there is one, else a.b
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                deps.update(resolve(f"{base}.{alias.name}") for alias in node.names)
        graph[module] = deps - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, as a path that closes on itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_project_is_part_of_an_import_cycle():
    graph = import_graph()
    assert "gateway.cli" in graph and "gateway.bench.config" in graph  # it did parse the project
    assert cycles(graph) == []


def test_building_the_cli_and_loading_the_serving_code_imports_no_bench_torch_or_transformers():
    code = (
        "import sys, gateway.cli as cli\n"
        "parser = cli.build_parser()\n"
        "for command in ('serve', 'gateway', 'inference', 'classify x.csv --column c', 'bench'):\n"
        "    parser.parse_known_args(command.split())\n"
        "import gateway.workers, gateway.stack, gateway.server, gateway.servicer, gateway.classify, gateway.classify.embedded, "
        "inference.service, cache\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    imported = done.stdout.split()
    assert "gateway.workers" in imported
    assert [m for m in imported if _forbidden(m)] == []


def test_a_running_gateway_and_its_workers_never_import_the_benchmark_harness(procs, tmp_path, tiny_model):
    inference = procs.inference(tiny_model)
    procs.env = {**procs.env, "PYTHONPROFILEIMPORTTIME": "1"}  # every process prints what it imports, on stderr
    gateway = procs.gateway(inference, tmp_path / "l2", None, workers=2)
    assert gateway.stop() == 0
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)\s*$", "".join(gateway.output), re.M)
    # What it read is what we think it is: both processes' imports (worker 0 and the other worker).
    assert imported.count("gateway.server") == 2 and "grpc" in imported
    assert sorted({m for m in imported if _forbidden(m)}) == []
