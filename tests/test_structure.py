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


# Modules whose import pulls in TensorFlow (directly or through another distrain module's top-level
# imports): the Keras callback classes, which must subclass tf.keras.callbacks.Callback. Every other
# module imports TensorFlow inside the functions that need it, so validation, the launchers and
# `distrain --help` stay fast and a bad job exits 2 before TensorFlow starts.
TENSORFLOW_AT_TOP = {"distrain.backends.horovod", "distrain.backends.stepmetrics", "distrain.callbacks",
                     "distrain.data.inputwatch", "distrain.lossscale", "distrain.tensorboard_log"}
TENSORFLOW = ("tensorflow", "tf_keras", "keras", "horovod")
# The package's __init__ keeps `import distrain` cheap: distrain.train is imported on first use.
LAZY_ALLOWED = {("distrain", "distrain.api")}


def _resolve(name: str, path: Path, node, known: set) -> set:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def _top_level_imports(name: str, path: Path, known: set) -> set:
    """Everything a module imports when it is imported (not inside functions, not for type checking)."""
    found, body = set(), list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _resolve(name, path, node, known)
        elif isinstance(node, ast.Try):
            body += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            body += node.body + node.orelse
    return found


def _pulls_in_tensorflow(modules: dict) -> set:
    known = set(modules)
    top = {name: _top_level_imports(name, path, known) for name, path in modules.items()}
    heavy = {name for name, imports in top.items() if any(i.split(".")[0] in TENSORFLOW for i in imports)}
    changed = True
    while changed:
        changed = False
        for name, imports in top.items():
            if name not in heavy and imports & heavy:
                heavy.add(name)
                changed = True
    return heavy


def test_only_the_listed_modules_import_tensorflow_when_imported():
    modules = dict(_modules())
    assert _pulls_in_tensorflow(modules) == TENSORFLOW_AT_TOP


def test_modules_that_do_not_pull_in_tensorflow_are_imported_at_the_top():
    modules = dict(_modules())
    known, heavy = set(modules), _pulls_in_tensorflow(modules)
    lazy = []
    for name, path in modules.items():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in _resolve(name, path, node, known) & known:
                        if target not in heavy and target != name and (name, target) not in LAZY_ALLOWED:
                            lazy.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target} inside "
                                        f"{function.name}; import it at the top")
    assert not lazy, "\n".join(lazy)
