"""The user's own code in a job: import references, their checks, and the loss and metrics.

A job names user code with an *import reference* where it would name a built-in:

- ``model.name: my_package.models:build``      a module importable on ``sys.path`` / ``PYTHONPATH``;
- ``model.name: models/inception.py:build``     a file, relative to the job file or absolute.

A file is imported as Python would run it as a script: its directory goes first on ``sys.path``
(so it can import its sibling modules) and it becomes the module named after the file. Every
failure is a ``UsageError`` of one line naming the job key, the reference, the file (with the line
for import errors) and what was expected; nothing here trains, so the CLI, the Python API and the
launchers call ``check_spec`` before any worker starts.

Contracts (the same as the built-in builders and ``tf.keras.datasets``):

- model: ``fn(input_shape, num_classes, **model.params) -> tf.keras.Model`` (uncompiled, one output
  of shape ``(batch, num_classes)``, see ``output_problem``), called inside the strategy's scope;
  ``kernel_regularizer=`` is passed when the function takes it.
- data, arrays: ``fn() -> (x_train, y_train), (x_test, y_test)`` (see ``distrain.data.user``).
- data, tf.data: ``fn(input_context, split) -> tf.data.Dataset`` (see ``distrain.data.user``).
- loss: a Keras loss name, or a reference to ``fn(y_true, y_pred)`` or a ``tf.keras.losses.Loss``
  class; metrics likewise (names, functions or ``tf.keras.metrics.Metric`` classes).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import logging
import os
import re
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from distrain.errors import UsageError

log = logging.getLogger("distrain")

# module.sub:function or some/path.py:function (a function may be a dotted attribute, Class.create).
_REFERENCE = re.compile(r"^(?P<target>[^:\s][^:]*?):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
EXPECTED = "package.module:function or path/to/file.py:function"

# Files imported by this process: absolute path → module. A file imported twice (the spec check,
# then the build inside the strategy scope) must give the same module, as ``import`` would.
_FILES: dict[str, Any] = {}
# Code that a launcher shipped to this node under a module name (Ray's py_modules), used when a
# file reference's path does not exist here: absolute path on the submitting machine → module name.
_SHIPPED: dict[str, str] = {}


@dataclass(frozen=True)
class Reference:
    """A parsed reference: exactly one of ``module`` and ``file`` is set."""

    text: str
    attr: str
    module: Optional[str] = None
    file: Optional[str] = None

    @property
    def where(self) -> str:
        return self.file or self.module or ""


def is_reference(text: Any) -> bool:
    """Whether a job value is meant as an import reference (it has a colon; names never do)."""
    return isinstance(text, str) and ":" in text


def parse(text: str) -> Reference:
    """Splits a reference into its module or file and the attribute.

    Raises:
        ValueError: the text is no reference (the message says what is expected).
    """
    m = _REFERENCE.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"expected {EXPECTED}")
    target, attr = m.group("target"), m.group("attr")
    if target.endswith(".py") or "/" in target or os.sep in target:
        if not target.endswith(".py"):
            raise ValueError(f"expected a .py file before the colon ({EXPECTED})")
        return Reference(text, attr, file=target)
    if not _MODULE.match(target):
        raise ValueError(f"expected a dotted module name or a .py file before the colon ({EXPECTED})")
    return Reference(text, attr, module=target)


def absolute(text: str, base_dir: Path) -> str:
    """The reference with a relative file made absolute against ``base_dir`` (the job's directory).

    The run dir's ``job.yaml`` then names the same file wherever it is read from (``--resume``).
    """
    ref = parse(text)
    if ref.file is None or os.path.isabs(ref.file):
        return text
    return f"{os.path.abspath(Path(base_dir) / ref.file)}:{ref.attr}"


def ship(path: str, module_name: str) -> None:
    """Tells this process that the file ``path`` of a reference arrived as module ``module_name``.

    Launchers that copy code to their workers (Ray's ``py_modules``) call this on the worker; a
    reference to ``path`` then imports ``module_name`` when ``path`` does not exist on this node.
    """
    _SHIPPED[os.path.abspath(path)] = module_name


def is_shipped(path: str) -> bool:
    """Whether a launcher shipped the file ``path`` to this node under another path (see ``ship``)."""
    return os.path.abspath(path) in _SHIPPED


def _import_error(key: str, ref: Reference, err: BaseException) -> UsageError:
    """One line: the deepest frame of the user's code (or the syntax error's position) and the error."""
    if isinstance(err, SyntaxError) and err.filename:
        at = f"{err.filename}:{err.lineno}"
        what = f"SyntaxError: {err.msg}"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if not f.filename.startswith("<frozen") and "importlib" not in f.filename
                  and not f.filename.startswith(os.path.dirname(__file__))]
        at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ref.where
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        what = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return UsageError(f"{key}: {ref.text}: importing it failed at {at}: {what}")


def _load_file(key: str, ref: Reference):
    path = os.path.abspath(ref.file)
    if path in _FILES:
        return _FILES[path]
    if not os.path.isfile(path):
        if path in _SHIPPED:
            return _load_module(key, Reference(ref.text, ref.attr, module=_SHIPPED[path]))
        raise UsageError(f"{key}: {ref.text}: no such file {path} (a relative path is relative to the job file)")
    name = Path(path).stem
    if not _MODULE.match(name):
        raise UsageError(f"{key}: {ref.text}: {Path(path).name} is not a usable module name "
                         "(letters, digits and _; rename the file)")
    taken = sys.modules.get(name)
    if taken is not None and os.path.abspath(getattr(taken, "__file__", "") or "") != path:
        raise UsageError(f"{key}: {ref.text}: the module name {name} is already taken by "
                         f"{getattr(taken, '__file__', None) or 'a built-in module'}; rename {Path(path).name}")
    # As `python file.py` does: its directory first, so it imports its sibling modules.
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    if taken is not None:
        _FILES[path] = taken
        return taken
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # noqa: BLE001 - the user's module may raise anything while importing
        del sys.modules[name]
        if isinstance(err, KeyboardInterrupt):
            raise
        raise _import_error(key, ref, err) from None
    _FILES[path] = module
    return module


def _load_module(key: str, ref: Reference):
    try:
        return importlib.import_module(ref.module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if ref.module == missing or ref.module.startswith(missing + "."):
            raise UsageError(f"{key}: {ref.text}: no module named {missing} on sys.path; expected {EXPECTED} "
                             "(install the package, or add its directory to PYTHONPATH)") from None
        raise _import_error(key, ref, err) from None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001
        raise _import_error(key, ref, err) from None


def resolve(text: str, key: str) -> Callable:
    """Imports a reference and returns the object it names.

    Args:
        text: the reference, e.g. ``models/inception.py:build``.
        key: the job key it came from, for messages (``model.name``).

    Raises:
        UsageError: one line naming the key, the reference and what went wrong.
    """
    try:
        ref = parse(text)
    except ValueError as err:
        raise UsageError(f"{key}: {text}: {err}") from None
    module = _load_file(key, ref) if ref.file else _load_module(key, ref)
    obj = module
    for part in ref.attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                            and getattr(v, "__module__", None) == module.__name__)
            has = f"; it defines: {', '.join(public)}" if public else ""
            raise UsageError(f"{key}: {text}: {getattr(module, '__file__', None) or module.__name__} has no "
                             f"{ref.attr}{has}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{key}: {text}: {ref.attr} is a {type(obj).__name__}, expected a function")
    return obj


def defined_at(fn: Callable) -> str:
    """``file:line`` of a function's definition, for messages."""
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        return getattr(fn, "__module__", "?") or "?"


def _signature(fn: Callable):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: let the call decide


def check_call(fn: Callable, key: str, text: str, args: tuple, kwargs: Mapping[str, Any], expected: str) -> None:
    """Raises ``UsageError`` unless ``fn(*args, **kwargs)`` binds to ``fn``'s signature."""
    sig = _signature(fn)
    if sig is None:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        name = getattr(fn, "__name__", text)
        raise UsageError(f"{key}: {text}: {name}{sig} at {defined_at(fn)} cannot be called as {expected} "
                         f"({err})") from None


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name or through ``**kwargs``)."""
    sig = _signature(fn)
    if sig is None:
        return False
    params = sig.parameters.values()
    return any(p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) or any(
        p.kind is p.VAR_KEYWORD for p in params)


def keyword_params(fn: Callable) -> dict[str, object]:
    """The keyword parameters after ``(input_shape, num_classes)`` and their defaults (None: required)."""
    sig = _signature(fn)
    if sig is None:
        return {}
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in params if p.kind is p.KEYWORD_ONLY] + positional[2:]
    return {p.name: (None if p.default is p.empty else p.default) for p in rest if p.name != "kernel_regularizer"}


# ----------------------------------------------------------------------------- models

def model_function(text: str, *, key: str = "model.name", params: Mapping[str, Any] = (),
                   regularized: bool = False) -> Callable:
    """The user's model builder, its signature checked against how distrain calls it.

    Args:
        text: the reference.
        key: the job key, for messages.
        params: ``model.params``.
        regularized: ``train.l1`` or ``train.l2`` is set, so the builder must take
            ``kernel_regularizer`` (distrain does not silently drop the setting).
    """
    fn = resolve(text, key)
    params = dict(params or {})
    expected = "fn(input_shape, num_classes" + "".join(f", {k}=..." for k in params) + ")"
    check_call(fn, key, text, ((32, 32, 3), 10), params, expected)
    if regularized and not accepts(fn, "kernel_regularizer"):
        raise UsageError(f"train.l2: set, but {key} {text} ({defined_at(fn)}) takes no kernel_regularizer "
                         "argument; add kernel_regularizer=None to it and pass it to its layers, or set train.l1 "
                         "and train.l2 to 0")
    return fn


def build_user_model(text: str, input_shape: tuple[int, ...], num_classes: int, *, l1: float = 0.0,
                     l2: float = 0.0, loss: str = "sparse_categorical_crossentropy", **params: Any):
    """Calls the user's model builder and checks what it returns: a Keras model with one output of
    the shape ``train.loss`` takes, ``(batch, num_classes)`` (see ``output_problem``)."""
    key = "model.name"
    fn = model_function(text, key=key, params=params, regularized=l1 > 0 or l2 > 0)
    import tensorflow as tf

    if accepts(fn, "kernel_regularizer"):
        params["kernel_regularizer"] = tf.keras.regularizers.L1L2(l1=l1, l2=l2) if l1 > 0 or l2 > 0 else None
    # The user's exceptions are the user's: they propagate with their own traceback.
    model = fn(tuple(input_shape), num_classes, **params)
    if not isinstance(model, tf.keras.Model):
        kind = type(model).__module__ + "." + type(model).__qualname__
        hint = (" (a Keras 3 model: import distrain before tensorflow/keras, or use tf.keras)"
                if kind.startswith("keras.") else "")
        raise UsageError(f"{key}: {text}: {getattr(fn, '__name__', text)} ({defined_at(fn)}) returned {kind}, "
                         f"expected an uncompiled tf.keras.Model{hint}")
    outputs = model.outputs or []
    shapes = [tuple(output.shape) for output in outputs]
    problem = output_problem(shapes, num_classes, loss)
    if problem:
        raise UsageError(f"{key}: {text}: {getattr(fn, '__name__', text)} ({defined_at(fn)}) {problem}")
    return float32_output(model, f"{key}: {text}")


def float32_output(model, where: str):
    """The model with its output in float32: as it is when it is, else wrapped in a model that casts
    it, with one log line (``where`` names the model).

    Under ``train.precision`` mixed_float16 or mixed_bfloat16 a model whose last layer follows the
    policy outputs float16 or bfloat16, and the loss (a softmax's probabilities near 0 and 1 above
    all) is then computed from rounded values; TensorFlow's mixed-precision guide ends the model in
    float32. The cast is a float32 linear ``Activation`` after the output, in a functional model over
    the user's own layers: their weights and names are untouched, one layer (``float32_output``) is added.
    """
    import tensorflow as tf

    dtype = tf.as_dtype(model.outputs[0].dtype)
    if dtype == tf.float32 or not dtype.is_floating:
        return model
    log.info("%s: the model's output is %s; distrain casts it to float32 for the loss (end the model with a layer "
             "of dtype=\"float32\" to do it yourself: docs/precision.md)", where, dtype.name)
    outputs = tf.keras.layers.Activation("linear", dtype="float32", name="float32_output")(model.outputs[0])
    return tf.keras.Model(model.inputs, outputs, name=model.name)


def expected_output(num_classes: int, loss: str = "sparse_categorical_crossentropy") -> int:
    """How many values per image the model's output must have for ``train.loss``.

    distrain's labels are one integer class per image (every source), so the crossentropies by name
    fix the width: ``binary_crossentropy`` takes one probability of class 1, the others one score per
    class. A loss distrain cannot read (the user's own, or another Keras loss) gets one score per
    class too: the model contract and the ``accuracy`` metric assume it.
    """
    return 1 if loss == "binary_crossentropy" else num_classes


def output_problem(shapes: list[tuple], num_classes: int, loss: str = "sparse_categorical_crossentropy"
                   ) -> Optional[str]:
    """What is wrong with a model's output shapes for ``num_classes`` and ``train.loss``, as the end
    of a one-line message with a hint; None when the model has one output of ``(batch, units)``
    (see ``expected_output``).

    Keras itself only fails inside ``fit``, deep in the loss: an unpooled ``(None, 46, 46, 3)``
    becomes ``logits.shape=(67712, 3)`` after some 60 lines, so the whole shape is checked here.

    Example:
        >>> output_problem([(None, 10)], 10) is None
        True
    """
    units = expected_output(num_classes, loss)
    if loss == "binary_crossentropy":
        wanted = f"(batch, 1): one probability of class 1 per image for {loss}"
    else:
        wanted = f"(batch, {units}): one score for each of the {num_classes} classes per image"
        wanted += f" for {loss}" if loss in CROSSENTROPIES else ""
    if loss == "binary_crossentropy" and num_classes > 2:
        return (f"is trained with train.loss {loss}, which takes labels 0 and 1, but this job has {num_classes} "
                "classes (use sparse_categorical_crossentropy and end the model with Dense(num_classes))")
    if len(shapes) != 1:
        return f"returned a model with {len(shapes)} outputs; expected one output of shape {wanted}"
    shape = shapes[0]
    if len(shape) == 2 and shape[1] == units:
        return None
    if len(shape) > 2:
        hint = "add a GlobalAveragePooling2D or Flatten before the last Dense"
    elif len(shape) < 2:
        hint = f"end the model with Dense({'1' if units == 1 else 'num_classes'})"
    elif units == 1:
        hint = "end the model with Dense(1, activation=\"sigmoid\")"
    elif shape[1] == 1 and num_classes == 2:
        hint = ("the last Dense needs num_classes units, 2 here; or set train.loss: binary_crossentropy "
                "for one sigmoid output")
    else:
        hint = f"the last Dense needs num_classes units, {num_classes} here, not {shape[1]}"
    return f"returned a model with output shape {shape}; expected {wanted} ({hint})"


# ----------------------------------------------------------------------------- loss and metrics

CROSSENTROPIES = {"sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
                  "categorical_crossentropy": "CategoricalCrossentropy",
                  "binary_crossentropy": "BinaryCrossentropy"}
DEFAULT_LOSS = "sparse_categorical_crossentropy"


def _keras_object(value: Any, tf, base: type, key: str, text: str, instantiate: bool):
    """A reference's object as Keras takes it: classes are instantiated, functions checked.

    With ``instantiate=False`` a class is only checked: a metric creates variables, which must not
    happen before the strategy exists (it fixes the devices).
    """
    if inspect.isclass(value):
        if not issubclass(value, base):
            raise UsageError(f"{key}: {text}: {value.__name__} is a class but not a "
                             f"tf.keras.{base.__module__.split('.')[-1]}.{base.__name__}")
        check_call(value, key, text, (), {}, f"{value.__name__}() (every argument with a default)")
        return value() if instantiate else value
    check_call(value, key, text, ("y_true", "y_pred"), {}, "fn(y_true, y_pred)")
    return value


def loss_object(train, tf, instantiate: bool = True):
    """``train.loss`` and ``train.from_logits`` as what ``model.compile(loss=...)`` takes."""
    name, key = train.loss, "train.loss"
    if is_reference(name):
        if train.from_logits:
            raise UsageError(f"train.from_logits: only for Keras crossentropy losses by name; the loss "
                             f"{name} is yours, so apply from_logits inside it")
        loss = _keras_object(resolve(name, key), tf, tf.keras.losses.Loss, key, name, instantiate)
        if instantiate and train.precision == "mixed_float16":
            check_scalable_loss(loss, name, tf)
        return loss
    if name == "categorical_crossentropy":
        # Keras would fail inside fit: "Shapes (32, 1) and (32, 10) are incompatible".
        raise UsageError("train.loss: categorical_crossentropy takes one-hot labels, but distrain's labels are "
                         "integer classes; use sparse_categorical_crossentropy (the same loss for integer labels)")
    if name in CROSSENTROPIES:
        return getattr(tf.keras.losses, CROSSENTROPIES[name])(from_logits=train.from_logits)
    if train.from_logits:
        raise UsageError(f"train.from_logits: only for the crossentropy losses ({', '.join(CROSSENTROPIES)}), "
                         f"got train.loss {name}")
    try:
        loss = tf.keras.losses.get(name)
    except (ValueError, TypeError):
        loss = None
    if callable(loss):
        return loss
    raise UsageError(f"train.loss: unknown Keras loss {name!r}; expected a name such as "
                     f"{', '.join(CROSSENTROPIES)}, mean_squared_error, or {EXPECTED}")


def check_scalable_loss(loss, text: str, tf) -> None:
    """Refuses a loss of the user's that mixed_float16's loss scaling cannot scale: one whose value
    is not float32 (the model's output is float32: ``float32_output``).

    The loss is multiplied by the scale (2**15 at the start) in the loss's own dtype: a float16 loss
    overflows to inf from a value of 2 on, every step is then skipped and the scale falls towards 0;
    an integer loss has no gradient at all. Tried on a batch of two uniform predictions of two
    classes; a loss that cannot take those is left to training's own errors.

    Raises:
        UsageError: one line naming ``train.loss``, the dtype and the fix.
    """
    try:
        value = tf.convert_to_tensor(loss(tf.constant([0, 1]), tf.fill((2, 2), 0.5)))
    except Exception:  # noqa: BLE001  (a loss made for other shapes: training reports its own errors)
        return
    if value.dtype != tf.float32:
        raise UsageError(f"train.loss: {text} returns {value.dtype.name} under train.precision mixed_float16; loss "
                         f"scaling multiplies it by up to 2**15, which {value.dtype.name} cannot hold: return the loss "
                         f"in float32 (compute it from y_pred as given, or tf.cast it to float32): docs/precision.md")


def metric_objects(train, tf, instantiate: bool = True) -> list:
    """``train.metrics`` as what ``model.compile(metrics=...)`` takes (names stay names for Keras)."""
    out = []
    for i, name in enumerate(train.metrics):
        key = f"train.metrics[{i}]"
        if is_reference(name):
            out.append(_keras_object(resolve(name, key), tf, tf.keras.metrics.Metric, key, name, instantiate))
            continue
        try:
            known = callable(tf.keras.metrics.get(name))  # tf-keras hands unknown names back as strings
        except (ValueError, TypeError):
            known = False
        if not known:
            raise UsageError(f"{key}: unknown Keras metric {name!r}; expected a name such as accuracy, "
                             f"sparse_top_k_categorical_accuracy, or {EXPECTED}")
        out.append(name)
    return out


def compile_args(train, *, instantiate: bool = True) -> tuple[Any, list]:
    """``(loss, metrics)`` for ``model.compile`` from the job's ``train`` section.

    ``run.py`` calls it inside the strategy scope, where Keras creates the metrics' variables.

    Example:
        >>> loss, metrics = compile_args(spec.train)  # doctest: +SKIP
        >>> model.compile(optimizer=optimizer, loss=loss, metrics=metrics)  # doctest: +SKIP
    """
    import tensorflow as tf

    return loss_object(train, tf, instantiate), metric_objects(train, tf, instantiate)


# ----------------------------------------------------------------------------- the whole job

def references(spec) -> dict[str, str]:
    """Every import reference of a job: ``{job key: reference}``."""
    found = {}
    if is_reference(spec.model.name):
        found["model.name"] = spec.model.name
    if is_reference(spec.data.source):
        found["data.source"] = spec.data.source
    if is_reference(spec.train.loss):
        found["train.loss"] = spec.train.loss
    for i, metric in enumerate(spec.train.metrics):
        if is_reference(metric):
            found[f"train.metrics[{i}]"] = metric
    return found


def code_to_ship(spec) -> dict[str, str]:
    """The user's code a launcher must copy to nodes that may not see it: ``{local path: module name}``.

    A file reference gives its file; a module reference its top-level package (or single-file
    module) unless it is installed (site-packages) or part of distrain. Pass the paths to Ray's
    ``py_modules``; on the worker, ``ship(path, name)`` maps file references to the copies.
    """
    import sysconfig

    installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    shipped = {}
    for key, text in references(spec).items():
        ref = parse(text)
        if ref.file is not None:
            shipped[os.path.abspath(ref.file)] = Path(ref.file).stem
            continue
        top = ref.module.split(".")[0]
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None or top == "distrain":
            continue
        locations = list(found.submodule_search_locations or []) or ([found.origin] if found.origin else [])
        if len(locations) != 1 or not os.path.exists(locations[0]):
            continue  # a namespace package or a built-in: nothing to copy
        path = os.path.realpath(locations[0])
        if not any(path.startswith(root + os.sep) for root in installed):
            shipped[path] = top
    return shipped


ARRAYS, DATASET = "arrays", "dataset"  # the two contracts of a data.source function


def data_function(text: str) -> tuple[Callable, str]:
    """The user's data function and its contract (``ARRAYS`` or ``DATASET``), from its signature."""
    fn = resolve(text, "data.source")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn, ARRAYS
    try:
        sig.bind()
        return fn, ARRAYS
    except TypeError:
        pass
    check_call(fn, "data.source", text, ("input_context", "split"), {},
               "fn() returning (x_train, y_train), (x_test, y_test), or fn(input_context, split) returning "
               "a tf.data.Dataset")
    return fn, DATASET


def check_spec(spec, source: str = "") -> None:
    """Imports every reference of a job and checks it against its contract, before anything starts.

    What needs the data or a built model (the model's output size, the loader's arrays) is checked
    when the run builds them, still before the first training step.

    Args:
        spec: the validated ``JobSpec``.
        source: the job file, prefixed to messages (``jobs/x.yaml: model.name: ...``).

    Raises:
        UsageError: one line naming the job key, the reference, the file and what was expected.
    """
    if not references(spec) and spec.train.loss == DEFAULT_LOSS and spec.train.metrics == ["accuracy"] \
            and not spec.train.from_logits:
        return  # nothing of the user's: no need to import TensorFlow here
    try:
        if is_reference(spec.model.name):
            model_function(spec.model.name, params=spec.model.params,
                           regularized=spec.train.l1 > 0 or spec.train.l2 > 0)
        if is_reference(spec.data.source):
            data_function(spec.data.source)
        compile_args(spec.train, instantiate=False)
    except UsageError as err:
        if source:
            raise UsageError(f"{source}: {err}") from None
        raise


# Callables the API was given that no reference can name (lambdas, closures, partials) live as
# attributes of this module for the process's lifetime, so they have a reference like any other.
CALLABLES_MODULE = "distrain_callables"
_counter = itertools.count(1)


def reference_of(obj: Union[str, Callable], what: str) -> str:
    """The import reference naming ``obj``: itself for a string, ``module:qualname`` for a function
    defined at the top of a module (a notebook's ``__main__`` included), else a name in
    ``distrain_callables`` (valid in this process only)."""
    if isinstance(obj, str):
        return obj
    if not callable(obj):
        raise UsageError(f"{what}: expected a function or an import reference, got "
                         f"{type(obj).__name__}")
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    module = sys.modules.get(module_name or "")
    if module is not None and qualname and "<" not in qualname:
        target: Any = module
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is obj:
            return f"{module_name}:{qualname}"
    holder = sys.modules.get(CALLABLES_MODULE)
    if holder is None:
        holder = sys.modules[CALLABLES_MODULE] = types.ModuleType(
            CALLABLES_MODULE, "Functions given to distrain.train that have no import reference of their own.")
    base = "".join(c if c.isalnum() else "_" for c in getattr(obj, "__name__", "") or what).strip("_") or what
    name = f"{base}_{next(_counter)}"
    setattr(holder, name, obj)
    return f"{CALLABLES_MODULE}:{name}"
