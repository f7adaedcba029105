"""docs/architecture.md against the code: its module table, start-up callers, stages of a run,
backend interface and run-dir names.

Everything is read with ``ast`` from the sources (nothing under distrain/ is imported, so no
TensorFlow): the test takes a fraction of a second. When it fails, the code changed and the doc did
not (or the other way round): update docs/architecture.md, not the rules here.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Optional

from conftest import REPO

PACKAGE = REPO / "distrain"
DOC_PATH = REPO / "docs" / "architecture.md"
TF_ROOTS = ("tensorflow", "tf_keras")
TF_COLUMN = ("top level", "lazily", "no")


# -- reading the doc -----------------------------------------------------------------------------

def _doc() -> str:
    return DOC_PATH.read_text()


def _section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading (``###`` stay inside)."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", _doc(), re.M | re.S)
    assert match, f"{DOC_PATH.name} has no section '## {title}'"
    return match.group(1)


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text``: a list of rows, each a dict from the header's names to cells."""
    tables, header, rows = [], None, []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(dict(zip(header, cells)))
        elif header is not None:
            tables.append(rows)
            header, rows = None, []
    return tables


def _rows(text: str, first: str) -> list[dict[str, str]]:
    """The rows of every table in ``text`` whose first column is named ``first``."""
    return [row for table in _tables(text) for row in table if first in row]


def _spans(text: str) -> list[str]:
    """The inline code spans of ``text``."""
    return re.findall(r"`([^`\n]+)`", text)


def _code_block(text: str) -> str:
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    assert match, "no ``` block in the section"
    return match.group(1)


# -- reading the code ----------------------------------------------------------------------------

def _module_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    """``distrain/backends/factory.py`` → ``distrain.backends.factory``; a package's ``__init__`` → the package."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _module_files()}


def _module_path(dotted: str) -> Optional[Path]:
    """The file of ``dotted`` (``backends.factory`` or ``distrain.backends.factory``), if it is a module."""
    name = dotted if dotted == "distrain" or dotted.startswith("distrain.") else f"distrain.{dotted}"
    return _modules().get(name)


def _defs(body: list) -> dict[str, ast.AST]:
    return {n.name: n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _walk_defs(node: ast.AST, parts: list[str]) -> Optional[ast.AST]:
    for part in parts:
        if not isinstance(node, (ast.Module, ast.ClassDef)):
            return None
        node = _defs(node.body).get(part)
        if node is None:
            return None
    return node


def _resolve(dotted: str, default: Optional[Path] = None) -> Optional[ast.AST]:
    """The definition a name of the doc stands for.

    ``name`` is a top-level definition of ``default``; ``module.name`` / ``package.module.Class.method``
    is looked up from the longest prefix that is a module of distrain; ``Class.method`` (no module)
    in the one module of distrain that defines ``Class``.
    """
    parts = dotted.split(".")
    if len(parts) == 1:
        return _walk_defs(_tree(default or PACKAGE / "run.py"), parts)
    for cut in range(len(parts) - 1, 0, -1):
        path = _module_path(".".join(parts[:cut]))
        if path is not None:
            return _walk_defs(_tree(path), parts[cut:])
    owners = [p for p in _module_files() if isinstance(_defs(_tree(p).body).get(parts[0]), ast.ClassDef)]
    return _walk_defs(_tree(owners[0]), parts) if len(owners) == 1 else None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_targets(node: ast.AST, package: str) -> set[str]:
    """The modules an import statement imports (``from a import b`` imports ``a`` and, if a module, ``a.b``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
    return {base} | {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in _modules()}


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> tuple[frozenset, frozenset]:
    """(modules imported when the module is imported, modules imported only inside its functions).

    ``if TYPE_CHECKING:`` blocks are left out; class bodies and ``try``/``if`` blocks at top level
    run at import, so they count as top level.
    """
    path = _modules()[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top, lazy = set(), set()

    def visit(node: ast.AST, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if inside_function else top).update(_import_targets(child, package))
            visit(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(_tree(path), False)
    return frozenset(top), frozenset(lazy - top)


@functools.lru_cache(maxsize=None)
def _imports_tf_at_top(name: str, seen: tuple = ()) -> bool:
    """Whether importing the module imports TensorFlow (directly or through distrain modules)."""
    top, _ = _imports(name)
    if any(m.split(".")[0] in TF_ROOTS for m in top):
        return True
    return any(_imports_tf_at_top(m, seen + (name,)) for m in top if m in _modules() and m not in seen + (name,))


def _uses_import_tensorflow(name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "import_tensorflow"
               or isinstance(n, ast.Attribute) and n.attr == "import_tensorflow"
               or isinstance(n, ast.alias) and n.name == "import_tensorflow"
               for n in ast.walk(_tree(_modules()[name])))


def _tf_column(name: str) -> str:
    """What the module table must say: ``top level``, ``lazily`` or ``no``.

    Lazily: TensorFlow (or a distrain module that imports it at top level) imported inside a
    function, or ``tf_startup.import_tensorflow`` used (it imports TensorFlow when called; the rest
    of ``tf_startup``, its import hook and filter, imports nothing).
    """
    if _imports_tf_at_top(name):
        return "top level"
    top, lazy = _imports(name)
    if "distrain.tf_startup" in top | lazy and _uses_import_tensorflow(name):
        return "lazily"
    for m in lazy:
        if m.split(".")[0] in TF_ROOTS or (m in _modules() and _imports_tf_at_top(m)):
            return "lazily"
    return "no"


# -- (a) the module table ------------------------------------------------------------------------

def _module_rows() -> dict[str, dict[str, str]]:
    rows = {}
    for row in _rows(_section("Modules"), "module"):
        spans = _spans(row["module"])
        assert spans, f"a row of the module table names no module: {row}"
        assert spans[0] not in rows, f"{spans[0]} is in the module table twice"
        rows[spans[0]] = row
    return rows


def test_every_module_is_in_the_module_table_and_every_path_there_exists():
    listed = set(_module_rows())
    modules = {str(p.relative_to(REPO)) for p in _module_files()}
    assert not modules - listed, f"modules missing from the table of docs/architecture.md: {sorted(modules - listed)}"
    gone = {p for p in listed if not (REPO / p).is_file()}
    assert not gone, f"the module table of docs/architecture.md names files that do not exist: {sorted(gone)}"


def test_the_tensorflow_column_says_how_each_module_imports_tensorflow():
    wrong = []
    for path, row in _module_rows().items():
        said = row["TensorFlow"]
        kind = next((k for k in TF_COLUMN if said == k or said.startswith(k + " ")), None)
        if (REPO / path).is_file():
            actual = _tf_column(_module_name(REPO / path))
            if kind != actual:
                wrong.append(f"{path}: the doc says {said!r}, the imports say {actual!r}")
    assert not wrong, "\n".join(wrong)


# -- start-up ------------------------------------------------------------------------------------

def _startup_callers() -> set[tuple[str, str]]:
    """(``module.function``, ``startup.start|check``) for every function of distrain that calls the start-up."""
    found = set()
    for path in _module_files():
        module = _module_name(path).removeprefix("distrain.")
        if module == "startup":
            continue
        tree = _tree(path)
        direct = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module == "distrain.startup" for a in n.names}
        units = [(n.name, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        units += [(f"{c.name}.{m.name}", m) for c in tree.body if isinstance(c, ast.ClassDef)
                  for m in c.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for unit, node in units:
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                f = call.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "startup":
                    found.add((f"{module}.{unit}", f"startup.{f.attr}"))
                elif isinstance(f, ast.Name) and f.id in direct:
                    found.add((f"{module}.{unit}", f"startup.{direct[f.id]}"))
    return found


def test_the_start_up_table_names_every_caller_of_startup():
    rows = _rows(_section("Start-up"), "entry point")
    documented = {(_spans(r["function"])[0], _spans(r["calls"])[0]) for r in rows}
    actual = _startup_callers()
    assert actual, "no function of distrain calls startup.start or startup.check: has the start-up moved?"
    assert not actual - documented, f"callers missing from docs/architecture.md#start-up: {sorted(actual - documented)}"
    assert not documented - actual, f"docs/architecture.md#start-up names callers the code lacks: {sorted(documented - actual)}"


# -- (b) the stages of a run ---------------------------------------------------------------------

def _documented_stages() -> list[str]:
    """The first word of each unindented line of the stages block (indented lines are notes)."""
    return [line.split()[0] for line in _code_block(_section("The stages of a run")).splitlines()
            if line.strip() and not line[0].isspace()]


def _called_stages() -> list[str]:
    """The stages ``run.train`` calls, in source order: statement-level calls of run.py's top-level
    functions and of functions imported from distrain (``module.function``, without ``distrain.``).
    Calls inside other calls' arguments (what is only logged) and classes are left out."""
    tree = _tree(PACKAGE / "run.py")
    train = _defs(tree.body)["train"]
    local = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "distrain" and not node.level:
            package = node.module.removeprefix("distrain").removeprefix(".")
            for a in node.names:
                imported[a.asname or a.name] = f"{package}.{a.name}" if package else a.name
    inner = {id(c) for call in ast.walk(train) if isinstance(call, ast.Call)
             for arg in [*call.args, *call.keywords] for c in ast.walk(arg) if isinstance(c, ast.Call)}
    stages = []
    for call in sorted((n for n in ast.walk(train) if isinstance(n, ast.Call) and id(n) not in inner),
                       key=lambda n: (n.lineno, n.col_offset)):
        chain, f = [], call.func
        while isinstance(f, ast.Attribute):
            chain.insert(0, f.attr)
            f = f.value
        if not isinstance(f, ast.Name):
            continue
        if not chain and f.id in local:
            name = f.id
        elif f.id in imported:
            name = ".".join([imported[f.id], *chain])
        else:
            continue  # a local value's method (ctx.describe, dist.collective_deadline) or not distrain's
        if not name.split(".")[-1][0].isupper() and name not in stages:
            stages.append(name)
    return stages


def test_every_stage_in_the_doc_exists():
    stages = _documented_stages()
    assert stages, "the stages block of docs/architecture.md is empty"
    missing = [s for s in stages if not isinstance(_resolve(s), (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert not missing, f"stages in docs/architecture.md that are not functions of run.py or the module named: {missing}"


def test_every_stage_run_train_calls_is_in_the_doc_in_order():
    called = _called_stages()
    documented = _documented_stages()
    assert {"open_run_dir", "finish"} <= set(called), f"run.train's stages not found by the parser: {called}"
    assert not set(called) - set(documented), (
        f"stages run.train calls that docs/architecture.md does not name: {sorted(set(called) - set(documented))}")
    assert [s for s in documented if s in called] == called, (
        f"docs/architecture.md lists the stages as {documented}; run.train calls {called}")


# -- (c) the backend interface -------------------------------------------------------------------

def _distribution_class() -> ast.ClassDef:
    node = _resolve("backends.distribution.Distribution")
    assert isinstance(node, ast.ClassDef), "distrain/backends/distribution.py has no class Distribution"
    return node


def _public_methods(cls: ast.ClassDef) -> list[str]:
    return [n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not n.name.startswith("_")]


def _backend_classes() -> dict[str, ast.ClassDef]:
    """Every class of distrain that subclasses ``Distribution``."""
    found = {}
    for path in _module_files():
        for node in _tree(path).body:
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).split(".")[-1] == "Distribution"
                                                      for b in node.bases):
                found[node.name] = node
    return found


def _method_rows() -> dict[str, dict[str, str]]:
    rows = {}
    for row in _rows(_section("The backends"), "method"):
        match = re.match(r"`(\w+)", row["method"])
        assert match, f"a row of the backend table names no method: {row}"
        rows[match.group(1)] = row
    return rows


def test_every_method_of_distribution_is_in_the_backend_section_and_no_other():
    methods = set(_public_methods(_distribution_class()))
    documented = set(_method_rows())
    assert not methods - documented, f"Distribution's methods missing from docs/architecture.md: {sorted(methods - documented)}"
    assert not documented - methods, f"docs/architecture.md names methods Distribution lacks: {sorted(documented - methods)}"


def test_the_backend_table_says_which_backend_overrides_each_method_and_who_calls_it():
    backends = _backend_classes()
    assert {"TFDistribution", "HorovodDistribution"} <= set(backends), sorted(backends)
    wrong = []
    for method, row in _method_rows().items():
        said = {name for name in backends if re.search(rf"\b{name}\b", row["overridden by"])}
        actual = {name for name, cls in backends.items() if method in _public_methods(cls)}
        if said != actual:
            wrong.append(f"{method}: overridden by {sorted(actual)}, the doc says {sorted(said)}")
        for caller in _spans(row["called by"]):
            node = _resolve(caller)
            if node is None:
                wrong.append(f"{method}: called by {caller}, which does not exist")
            elif not any(isinstance(n, ast.Attribute) and n.attr == method for n in ast.walk(node)):
                wrong.append(f"{method}: called by {caller}, which does not use it")
    assert not wrong, "\n".join(wrong)


# -- (d) the run dir -----------------------------------------------------------------------------

def _run_dir_class() -> ast.ClassDef:
    node = _resolve("rundir.RunDir")
    assert isinstance(node, ast.ClassDef), "distrain/rundir.py has no class RunDir"
    return node


def _run_dir_names() -> dict[str, str]:
    """RunDir's string class attributes (``JOB = "job.yaml"``, ``A, B = "a", "b"``): name → value."""
    names = {}
    for node in _run_dir_class().body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                pairs = (zip(target.elts, node.value.elts)
                         if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                         else [(target, node.value)])
                for t, v in pairs:
                    if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        names[t.id] = v.value
    return names


def _run_dir_patterns() -> list[tuple[str, str]]:
    """The names RunDir builds under a run-dir path (``self.logs / f"rank{rank}.log"``), as regexes
    in which each formatted value is a ``<placeholder>``."""
    constants = _run_dir_names()
    found = []
    for node in ast.walk(_run_dir_class()):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.JoinedStr)
                and ast.unparse(node.left).startswith("self.")):
            continue
        regex = ""
        for part in node.right.values:
            if isinstance(part, ast.Constant):
                regex += re.escape(part.value)
            elif (isinstance(part.value, ast.Attribute) and ast.unparse(part.value.value) in ("self", "cls")
                  and part.value.attr in constants):
                regex += re.escape(constants[part.value.attr])
            else:
                regex += r"<[^<>]+>"
        found.append((ast.unparse(node.right), regex))
    return found


def test_every_run_dir_name_is_in_the_run_dir_section():
    names = _run_dir_names()
    assert {"JOB", "SEGMENTS", "CHECKPOINTS", "BACKUP", "RENDEZVOUS_SECRET"} <= set(names), sorted(names)
    spans = _spans(_section("Run dir"))
    missing = []
    for attr, value in sorted(names.items()):
        left = r"(?<!\w)" if value[0].isalnum() or value[0] == "_" else ""
        right = r"(?!\w)" if value[-1].isalnum() or value[-1] == "_" else ""
        if not any(re.search(left + re.escape(value) + right, span) for span in spans):
            missing.append(f"RunDir.{attr} = {value!r}")
    patterns = _run_dir_patterns()
    assert patterns, "RunDir builds no name with an f-string any more: update this test's expectation"
    missing += [f"RunDir's {text}" for text, regex in patterns if not any(re.search(regex, s) for s in spans)]
    assert not missing, f"run-dir names missing from docs/architecture.md#run-dir (as `code`): {missing}"


def test_the_doc_names_every_place_a_run_dir_lives():
    methods = [n.name for n in _run_dir_class().body if isinstance(n, ast.FunctionDef) and n.name.startswith("for_")]
    assert methods, "RunDir has no for_* method any more"
    section = _section("Run dir")
    missing = [m for m in methods if f"`RunDir.{m}`" not in section]
    assert not missing, f"docs/architecture.md#run-dir does not say where RunDir.{missing} puts a run dir"
