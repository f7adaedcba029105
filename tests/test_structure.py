"""The shape of the package: short functions, and no import cycle among distrain's modules."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "distrain"
MAX_FUNCTION_LINES = 60
# The model builders are layer tables: long, but one straight sequence each.
LONG_ALLOWED = {("distrain/models.py", n) for n in ("build_residual", "build_inception", "build_mobilenet_v2")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO)
        name = ".".join(rel.with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _docstring_lines(node) -> int:
    if ast.get_docstring(node) is None:
        return 0
    first = node.body[0]
    return first.end_lineno - first.lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # The signature and the code, not the docstring: long Args sections are welcome.
                lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                where = (str(path.relative_to(REPO)), node.name)
                if lines > MAX_FUNCTION_LINES and where not in LONG_ALLOWED:
                    long.append(f"{where[0]}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def _imports(name: str, path: Path, known: set) -> set:
    """distrain modules imported anywhere in the module, top level or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name and m != "distrain"}


def test_no_import_cycle():
    modules = dict(_modules())
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict = {}
    cycles = []

    def visit(node, stack):
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                cycles.append(" -> ".join(stack[stack.index(child):] + [child]))
            elif child not in state:
                visit(child, stack + [child])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
