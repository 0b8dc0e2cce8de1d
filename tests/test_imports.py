"""No import circle anywhere in serve/, model/, bench/ or code/: the graph of every import statement (module
level and inside functions, since a local import is the usual way a circle is hidden) between our modules is
acyclic."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serve", "model")
# Every folder of ours, with the folder its modules are imported from: code/ runs with PYTHONPATH=code
# (granite_sm.deploy, inference), the others from the repository root.
SOURCES = {"serve": ROOT, "model": ROOT, "bench": ROOT, "code": ROOT / "code"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import name`: name may be a submodule (serve.encoders) or an attribute of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules and n != me)
    return out


def graph(sources: dict[str, Path] | None = None) -> dict[str, set[str]]:
    sources = sources or {pkg: ROOT for pkg in PACKAGES}
    files = [(p, root) for pkg, root in sources.items() for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p, root) for p, root in files}
    return {module_name(p, root): imports_of(p, modules, root) for p, root in files}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        path.pop()
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_import_graph_is_acyclic():
    g = graph()
    assert "serve.app" in g and "model.engine.engine" in g and g["serve.app"]  # the walk found our modules
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere():
    g = graph(SOURCES)
    # the walk found every folder's modules and the edges between folders (code/ -> serve/, bench/ -> model/)
    assert {"serve.app", "model.engine.engine", "bench.run", "granite_sm.deploy", "inference"} <= set(g)
    assert "serve.handler" in g["inference"] and "bench.http_load" in g["bench.mid"]
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)
