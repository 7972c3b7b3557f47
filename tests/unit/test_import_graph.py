"""The package's import graph, read from the source (every import statement, also those inside
functions; not those under `if TYPE_CHECKING:`, which only annotations read and which never run):
no two files import each other, directly or through others, and each layer imports only the
layers to its right (cli -> trainer -> config -> engine -> planner)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raytune_llama"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, modules) if t.startswith("raytune_llama") else None
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circular_imports_between_files():
    assert _cycles(import_graph()) == []


def test_layers_import_only_to_their_right():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("raytune_llama.planner"):
            assert not {d for d in deps if not d.startswith("raytune_llama.planner")} - {
                "raytune_llama.lora_settings"}, (mod, deps)
        if mod.startswith("raytune_llama.engine"):
            assert not {d for d in deps if d.startswith(("raytune_llama.trainer", "raytune_llama.cli"))}, (mod, deps)
        if mod.startswith("raytune_llama.trainer"):
            assert not {d for d in deps if d.startswith("raytune_llama.cli")}, (mod, deps)


def test_the_planner_imports_neither_torch_ray_nor_deepspeed():
    for path in (PACKAGE / "planner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("torch", "ray", "deepspeed")], path
