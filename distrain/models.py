"""The five course models and their registry.

``MODELS`` maps each model name to its builder. The registry and ``model_params`` work without
TensorFlow, so the job-spec validator can check model names and parameters before TensorFlow is
imported; each builder imports TensorFlow itself. ``build_model`` is what training calls:

    model = build_model("residual", (32, 32, 3), 10, l2=1e-4, blocks=2)

Models are returned uncompiled: the optimizer and loss belong to the training loop, which must
create them inside the distribution strategy's scope.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from distrain import lr, user_code

if TYPE_CHECKING:
    import tensorflow as tf

# The classifier layer of every course model computes in float32 whatever ``train.precision``: a
# float16 softmax rounds probabilities near 0 and 1, and the loss is computed from them (TensorFlow's
# mixed-precision guide keeps the model's output in float32). Under float32 nothing changes.
OUTPUT_DTYPE = "float32"


def build_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    units: int = 128,
    dropout: float = 0.2,
    kernel_regularizer: tf.keras.regularizers.Regularizer | None = None,
) -> tf.keras.Model:
    """Builds the multilayer perceptron of the TensorFlow 2 beginner quickstart.

    Flatten → Dense(units, relu) → Dropout(dropout) → Dense(num_classes, softmax).

    Source: "TensorFlow 2 quickstart for beginners",
    https://www.tensorflow.org/tutorials/quickstart/beginner (the TF 2.0 version, which ends in a
    softmax layer).

    Args:
        input_shape: Shape of one example, without the batch axis, e.g. ``(28, 28, 1)``.
        num_classes: Number of output classes.
        units: Width of the hidden layer.
        dropout: Dropout rate after the hidden layer; no Dropout layer when 0.
        kernel_regularizer: Regularizer for every Dense kernel, or None.

    Returns:
        An uncompiled ``tf.keras.Model`` named ``"mlp"``.
    """
    import tensorflow as tf

    layers = tf.keras.layers
    model = tf.keras.Sequential(name="mlp")
    model.add(tf.keras.Input(shape=input_shape))
    model.add(layers.Flatten())
    model.add(layers.Dense(units, activation="relu", kernel_regularizer=kernel_regularizer))
    if dropout > 0:
        model.add(layers.Dropout(dropout))
    model.add(
        layers.Dense(num_classes, activation="softmax", kernel_regularizer=kernel_regularizer,
                     dtype=OUTPUT_DTYPE)
    )
    return model


def build_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    filters: int = 64,
    dropout: float = 0.0,
    kernel_regularizer: tf.keras.regularizers.Regularizer | None = None,
) -> tf.keras.Model:
    """Builds the course's single-block convolutional network.

    Conv2D(filters, 3x3, same, relu) → MaxPooling2D(2x2) → Flatten → [Dropout] →
    Dense(num_classes, softmax).

    Source: the first convolution block of the Keras example "Simple MNIST convnet",
    https://keras.io/examples/vision/mnist_convnet/, which also places Dropout just before the
    classifier.

    Args:
        input_shape: Shape of one image, ``(height, width, channels)``.
        num_classes: Number of output classes.
        filters: Number of 3x3 convolution filters.
        dropout: Dropout rate before the classifier; no Dropout layer when 0.
        kernel_regularizer: Regularizer for the Conv2D and Dense kernels, or None.

    Returns:
        An uncompiled ``tf.keras.Model`` named ``"cnn"``.
    """
    import tensorflow as tf

    layers = tf.keras.layers
    model = tf.keras.Sequential(name="cnn")
    model.add(tf.keras.Input(shape=input_shape))
    model.add(
        layers.Conv2D(
            filters, 3, padding="same", activation="relu", kernel_regularizer=kernel_regularizer
        )
    )
    model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    if dropout > 0:
        model.add(layers.Dropout(dropout))
    model.add(
        layers.Dense(num_classes, activation="softmax", kernel_regularizer=kernel_regularizer,
                     dtype=OUTPUT_DTYPE)
    )
    return model


def _pooled_classifier(x, num_classes, dropout, kernel_regularizer):
    """GlobalAveragePooling2D → [Dropout if dropout > 0] → Dense(num_classes, softmax)."""
    import tensorflow as tf

    layers = tf.keras.layers
    x = layers.GlobalAveragePooling2D()(x)
    if dropout > 0:
        x = layers.Dropout(dropout)(x)
    return layers.Dense(num_classes, activation="softmax", kernel_regularizer=kernel_regularizer,
                        dtype=OUTPUT_DTYPE)(x)


def build_residual(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 32,
    blocks: int = 3,
    dropout: float = 0.0,
    kernel_regularizer: tf.keras.regularizers.Regularizer | None = None,
) -> tf.keras.Model:
    """Builds a small residual network of basic blocks with identity shortcuts.

    Stem Conv3x3(width)-BN-ReLU, then ``blocks`` residual blocks Conv3x3-BN-ReLU-Conv3x3-BN,
    each added to its input and followed by ReLU, then GlobalAveragePooling2D → [Dropout] →
    Dense(num_classes, softmax).

    Source: the basic block and identity shortcut of He et al. 2016, "Deep Residual Learning for
    Image Recognition", https://arxiv.org/abs/1512.03385 (Sec. 3, Fig. 2; BN after each
    convolution and before the activation, Sec. 3.4). Unlike the paper's CIFAR-10 networks
    (Sec. 4.2) all blocks keep one width at stride 1, so every shortcut is an identity; this is
    the course's simple residual net, not a full ResNet.

    Args:
        input_shape: Shape of one image, ``(height, width, channels)``.
        num_classes: Number of output classes.
        width: Number of filters in every convolution.
        blocks: Number of residual blocks (0 leaves only the stem).
        dropout: Dropout rate before the classifier; no Dropout layer when 0.
        kernel_regularizer: Regularizer for every Conv2D and Dense kernel, or None.

    Returns:
        An uncompiled ``tf.keras.Model`` named ``"residual"``.

    Raises:
        ValueError: If ``blocks`` is negative or ``width`` is not positive.
    """
    if blocks < 0:
        raise ValueError(f"residual: blocks must be >= 0, got {blocks}")
    if width < 1:
        raise ValueError(f"residual: width must be >= 1, got {width}")
    import tensorflow as tf

    layers = tf.keras.layers

    def conv_bn(x, name):
        # BatchNormalization's beta makes a convolution bias redundant.
        x = layers.Conv2D(
            width,
            3,
            padding="same",
            use_bias=False,
            kernel_regularizer=kernel_regularizer,
            name=f"{name}_conv",
        )(x)
        return layers.BatchNormalization(name=f"{name}_bn")(x)

    inputs = tf.keras.Input(shape=input_shape)
    x = layers.ReLU(name="stem_relu")(conv_bn(inputs, "stem"))
    for i in range(1, blocks + 1):
        shortcut = x
        x = layers.ReLU(name=f"block{i}_relu1")(conv_bn(x, f"block{i}_1"))
        x = conv_bn(x, f"block{i}_2")
        x = layers.Add(name=f"block{i}_add")([shortcut, x])
        x = layers.ReLU(name=f"block{i}_out")(x)
    outputs = _pooled_classifier(x, num_classes, dropout, kernel_regularizer)
    return tf.keras.Model(inputs, outputs, name="residual")


# GoogLeNet's inception modules (Szegedy et al. 2014, Table 1), in network order:
# (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
_INCEPTION_MODULES = (
    ("3a", 64, 96, 128, 16, 32, 32),
    ("3b", 128, 128, 192, 32, 96, 64),
    ("4a", 192, 96, 208, 16, 48, 64),
    ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64),
    ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128),
    ("5a", 256, 160, 320, 32, 128, 128),
    ("5b", 384, 192, 384, 48, 128, 128),
)
# Table 1 has a 3x3/2 max pool in front of these modules.
_INCEPTION_POOL_BEFORE = frozenset({"4a", "5a"})
# The paper's stem ends in a 3x3 convolution with 192 filters, the input of module 3a.
_INCEPTION_STEM_FILTERS = 192


def build_inception(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    modules: int = 2,
    dropout: float = 0.4,
    kernel_regularizer: tf.keras.regularizers.Regularizer | None = None,
) -> tf.keras.Model:
    """Builds a small GoogLeNet of inception modules.

    Stem Conv3x3(192, relu) → MaxPool3x3/2, then the first ``modules`` inception modules of
    GoogLeNet (3a, 3b, 4a, …, 5b) with the paper's 3x3/2 max pools between 3b|4a and 4e|5a, then
    GlobalAveragePooling2D → Dropout(dropout) → Dense(num_classes, softmax). Each module
    concatenates four branches on the channel axis: 1x1; 1x1 → 3x3; 1x1 → 5x5;
    3x3 max pool (stride 1) → 1x1; every convolution uses ReLU. The default, modules 3a and 3b,
    outputs 256 and 480 channels as in the paper.

    Source: Szegedy et al. 2014, "Going Deeper with Convolutions", https://arxiv.org/abs/1409.4842
    (Fig. 2b; Table 1, including 40% dropout before the classifier). Departures: the paper's stem
    (7x7/2 conv, max pool, LRN, 1x1 and 3x3 convs, max pool) reduces 224x224 images 8x; for the
    course's 32x32 images one 3x3 convolution and one max pool (2x) keep enough resolution. The
    auxiliary classifiers are left out, as the paper does at inference (Sec. 5).

    Args:
        input_shape: Shape of one image, ``(height, width, channels)``.
        num_classes: Number of output classes.
        width: Multiplier on every filter count of the stem and the modules (at least 1 filter).
        modules: How many of GoogLeNet's nine inception modules to stack, 1 to 9.
        dropout: Dropout rate before the classifier; no Dropout layer when 0.
        kernel_regularizer: Regularizer for every Conv2D and Dense kernel, or None.

    Returns:
        An uncompiled ``tf.keras.Model`` named ``"inception"``.

    Raises:
        ValueError: If ``modules`` is not in 1..9 or ``width`` is not positive.
    """
    if not 1 <= modules <= len(_INCEPTION_MODULES):
        raise ValueError(
            f"inception: modules must be between 1 and {len(_INCEPTION_MODULES)}, got {modules}"
        )
    if width <= 0:
        raise ValueError(f"inception: width must be > 0, got {width}")
    import tensorflow as tf

    layers = tf.keras.layers

    def conv(x, filters, size, name):
        return layers.Conv2D(
            max(1, round(filters * width)),
            size,
            padding="same",
            activation="relu",
            kernel_regularizer=kernel_regularizer,
            name=name,
        )(x)

    def pool(x, name):
        return layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)

    inputs = tf.keras.Input(shape=input_shape)
    x = pool(conv(inputs, _INCEPTION_STEM_FILTERS, 3, "stem_conv"), "stem_pool")
    for name, n1x1, n3x3r, n3x3, n5x5r, n5x5, npool in _INCEPTION_MODULES[:modules]:
        if name in _INCEPTION_POOL_BEFORE:
            x = pool(x, f"pool_before_{name}")
        prefix = f"inception_{name}"
        branch_pool = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{prefix}_pool")(x)
        x = layers.Concatenate(name=f"{prefix}_concat")(
            [
                conv(x, n1x1, 1, f"{prefix}_1x1"),
                conv(conv(x, n3x3r, 1, f"{prefix}_3x3_reduce"), n3x3, 3, f"{prefix}_3x3"),
                conv(conv(x, n5x5r, 1, f"{prefix}_5x5_reduce"), n5x5, 5, f"{prefix}_5x5"),
                conv(branch_pool, npool, 1, f"{prefix}_pool_proj"),
            ]
        )
    outputs = _pooled_classifier(x, num_classes, dropout, kernel_regularizer)
    return tf.keras.Model(inputs, outputs, name="inception")


# MobileNetV2's bottleneck rows (Sandler et al. 2018, Table 2): expansion factor t, output
# channels c, repeats n, stride s of the first repeat (the others have stride 1).
_MOBILENET_V2_BOTTLENECKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Rounds ``v`` to the nearest multiple of ``divisor``, never below ``divisor`` or 90% of ``v``.

    The channel rounding of the reference MobileNetV2 implementations (TF-Slim, Keras
    applications), so width multipliers give the reference channel counts.
    """
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * v:
        rounded += divisor
    return rounded


def build_mobilenet_v2(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    alpha: float = 1.0,
    dropout: float = 0.0,
    kernel_regularizer: tf.keras.regularizers.Regularizer | None = None,
) -> tf.keras.Model:
    """Builds MobileNetV2 exactly as the layer table of the paper.

    conv2d 3x3/2 (32) → 17 inverted residual blocks (Table 2 rows) → conv2d 1x1 (1280) →
    global average pool → [Dropout] → Dense(num_classes, softmax). An inverted residual block is
    a 1x1 expansion by t (left out when t == 1, as Keras does), a 3x3 depthwise convolution with
    the row's stride and a linear 1x1 projection; BatchNormalization follows every convolution,
    ReLU6 follows the expansion and the depthwise convolution, and the block input is added when
    the stride is 1 and the channel counts match (10 blocks). With ``alpha`` = 1 and 224x224x3
    inputs, 1000 classes, it has the 3,538,984 parameters of
    ``tf.keras.applications.MobileNetV2(weights=None)``.

    Source: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    https://arxiv.org/abs/1801.04381 (Table 1, Table 2, Sec. 3.3), and the channel rounding and
    last-layer rule of the Keras reference, ``tf_keras/src/applications/mobilenet_v2.py``.

    Args:
        input_shape: Shape of one image, ``(height, width, channels)``; any size from 32x32 up.
        num_classes: Number of output classes.
        alpha: Width multiplier on every layer's channels, rounded to multiples of 8; the last
            1x1 convolution stays at 1280 channels unless ``alpha`` > 1.
        dropout: Dropout rate before the classifier; no Dropout layer when 0.
        kernel_regularizer: Regularizer for the Conv2D (full and pointwise) and Dense kernels, or
            None. Depthwise kernels are not regularized: Howard et al. 2017 (MobileNets, on
            training) put little or no weight decay on them, since they have so few parameters.

    Returns:
        An uncompiled ``tf.keras.Model`` named ``"mobilenet_v2"``.

    Raises:
        ValueError: If ``alpha`` is not positive.
    """
    if alpha <= 0:
        raise ValueError(f"mobilenet_v2: alpha must be > 0, got {alpha}")
    import tensorflow as tf

    layers = tf.keras.layers

    # Every convolution is followed by BatchNormalization, whose beta makes a bias redundant
    # (the Keras reference uses no biases either; parameter counts match it only this way).
    # epsilon is the reference's 1e-3; the momentum stays at the Keras default 0.99 rather than
    # the reference's 0.999: a large global batch leaves few steps per epoch, and moving
    # statistics with a ~1000-step time constant would still be stale at evaluation.
    def conv_bn(x, filters, kernel_size, name, strides=1):
        x = layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_regularizer=kernel_regularizer,
            name=name,
        )(x)
        return layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)

    def inverted_residual(inputs, expansion, filters, stride, name):
        in_channels = inputs.shape[-1]
        x = inputs
        if expansion != 1:
            x = conv_bn(x, expansion * in_channels, 1, f"{name}_expand")
            x = layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
        # "same" padding at stride 2 pads one row/column at the bottom/right for even sizes and
        # one on each side for odd sizes: the same as the reference's explicit
        # ZeroPadding2D(correct_pad) followed by a "valid" convolution.
        x = layers.DepthwiseConv2D(
            3, strides=stride, padding="same", use_bias=False, name=f"{name}_depthwise"
        )(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_depthwise_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_depthwise_relu")(x)
        # Linear bottleneck: no activation after the projection (Sec. 3.2).
        x = conv_bn(x, filters, 1, f"{name}_project")
        if stride == 1 and in_channels == filters:
            x = layers.Add(name=f"{name}_add")([inputs, x])
        return x

    inputs = tf.keras.Input(shape=input_shape)
    x = conv_bn(inputs, _make_divisible(32 * alpha), 3, "conv1", strides=2)
    x = layers.ReLU(6.0, name="conv1_relu")(x)
    block = 0
    for t, c, n, s in _MOBILENET_V2_BOTTLENECKS:
        for i in range(n):
            x = inverted_residual(
                x, t, _make_divisible(c * alpha), s if i == 0 else 1, f"block{block}"
            )
            block += 1
    # The paper does not shrink the last convolution for alpha < 1 (Sec. 6.1).
    last_filters = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = conv_bn(x, last_filters, 1, "conv_last")
    x = layers.ReLU(6.0, name="conv_last_relu")(x)
    # Table 2's "avgpool 7x7" and final "conv2d 1x1, k" on the pooled 1x1 map are global average
    # pooling and a Dense layer.
    outputs = _pooled_classifier(x, num_classes, dropout, kernel_regularizer)
    return tf.keras.Model(inputs, outputs, name="mobilenet_v2")


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: Registry key, also the Keras model name.
        builder: ``builder(input_shape, num_classes, *, <params>, kernel_regularizer=None)``.
        default_input_shape: Input shape of the course dataset the model was written for.
        description: One line for ``--help`` and error messages.
        params: Parameter count at the default input shape, ``REGISTRY_CLASSES`` classes and
            default parameters (``distrain models`` shows it without building the model;
            ``tests/test_models.py`` checks it against the built model).
    """

    name: str
    builder: Callable
    default_input_shape: tuple[int, ...]
    description: str
    params: int


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry("mlp", build_mlp, (28, 28, 1), "multilayer perceptron (TF 2 quickstart)", 101_770),
        ModelEntry("cnn", build_cnn, (28, 28, 1), "one conv + max-pool block, softmax classifier", 126_090),
        ModelEntry("residual", build_residual, (32, 32, 3), "residual net of identity basic blocks", 57_386),
        ModelEntry("inception", build_inception, (32, 32, 3), "GoogLeNet-style inception modules", 562_618),
        ModelEntry("mobilenet_v2", build_mobilenet_v2, (32, 32, 3), "MobileNetV2 (Sandler et al. 2018)", 2_270_794),
    )
}
REGISTRY_CLASSES = 10  # the class count of ModelEntry.params

# Set by build_model from l1/l2, so it is not a user parameter.
_REGULARIZER_PARAM = "kernel_regularizer"


def is_user_model(name: str) -> bool:
    """Whether ``name`` is an import reference to the user's builder rather than a course model."""
    return ":" in name


def default_input_shape(name: str) -> tuple[int, ...] | None:
    """The course dataset's input shape of a built-in model; None for a user's model (no default)."""
    return None if is_user_model(name) else _entry(name).default_input_shape


def _entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}") from None


def model_params(name: str) -> dict[str, object]:
    """Returns the parameters a model accepts and their defaults, without importing TensorFlow.

    Args:
        name: A key of ``MODELS``, or an import reference to the user's builder (which is
            imported: its parameters after ``(input_shape, num_classes)``, None for required ones).

    Returns:
        The builder's keyword-only parameters (except ``kernel_regularizer``, which
        ``build_model`` sets from ``l1``/``l2``) mapped to their defaults, in signature order,
        e.g. ``{"units": 128, "dropout": 0.2}`` for ``"mlp"``.

    Raises:
        ValueError: If ``name`` is not a registered model.
        UsageError: A reference that does not import.
    """
    if is_user_model(name):

        return user_code.keyword_params(user_code.resolve(name, "model.name"))
    signature = inspect.signature(_entry(name).builder)
    return {
        param.name: param.default
        for param in signature.parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name != _REGULARIZER_PARAM
    }


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    loss: str = "sparse_categorical_crossentropy",
    **params: object,
) -> tf.keras.Model:
    """Builds a registered model, uncompiled.

    Args:
        name: A key of ``MODELS`` (also the Keras model's name), or an import reference to the
            user's builder, ``package.module:function`` or ``path/file.py:function``, called as
            ``fn(input_shape, num_classes, **params)`` (with ``kernel_regularizer=`` if it takes it).
        input_shape: Shape of one example, without the batch axis.
        num_classes: Number of output classes.
        l1: L1 penalty on every Conv/Dense kernel (see each builder for exceptions).
        l2: L2 penalty on every Conv/Dense kernel; with both 0 no regularizer is attached.
        loss: ``train.loss``; a user's model's output shape is checked against what it takes.
        **params: The model's parameters, see ``model_params(name)``.

    Returns:
        The ``tf.keras.Model``, not compiled.

    Raises:
        ValueError: If ``name`` is not a registered model, or a parameter value is out of range.
        TypeError: If ``params`` holds a name the model does not accept.
        UsageError: A user's builder that does not import, does not take these arguments, or does
            not return a Keras model with one output of ``(batch, num_classes)`` (``(batch, 1)`` for
            ``binary_crossentropy``).

    Example:
        >>> model = build_model("mlp", (28, 28, 1), 10, l2=1e-4, units=64)
        >>> model = build_model("models/inception.py:build", (32, 32, 3), 10)  # doctest: +SKIP
    """
    if is_user_model(name):

        return user_code.build_user_model(name, tuple(input_shape), num_classes, l1=l1, l2=l2, loss=loss,
                                          **params)
    entry = _entry(name)
    valid = model_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        accepted = ", ".join(f"{key}={default!r}" for key, default in valid.items())
        raise TypeError(
            f"model {name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"valid parameters (defaults): {accepted}"
        )
    import tensorflow as tf

    regularizer = tf.keras.regularizers.L1L2(l1=l1, l2=l2) if l1 > 0 or l2 > 0 else None
    return entry.builder(
        tuple(input_shape), num_classes, kernel_regularizer=regularizer, **params
    )


def describe(name: str, input_shape: tuple[int, ...] | None = None, num_classes: int = 10) -> dict:
    """What ``distrain models --describe NAME`` prints: parameters, input shape, parameter count.

    Args:
        name: a course model or a reference to the user's builder.
        input_shape: the shape to build it for (default: the course dataset's, 32x32x3 for a
            user's model).
        num_classes: classes to build it for.
    """
    import tensorflow as tf

    shape = tuple(input_shape or default_input_shape(name) or (32, 32, 3))
    model = build_model(name, shape, num_classes)
    info = {"name": name, "model": model.name, "input_shape": list(shape), "classes": num_classes,
            "params": int(model.count_params()), "parameters": model_params(name)}
    if is_user_model(name):

        info["defined_at"] = user_code.defined_at(user_code.resolve(name, "model.name"))
    else:
        info["description"] = MODELS[name].description
    tf.keras.backend.clear_session()
    return info


def load_trained_model(path, *, compile: bool = True):
    """Loads a ``model.keras`` written by a distrain run, in Keras's safe mode.

    With ``compile=True`` the optimizer comes back with distrain's LR schedule, which this function
    registers first; ``compile=False`` needs nothing from distrain (plain ``tf.keras`` can do it).
    """
    import tensorflow as tf


    lr.ScheduledLR  # noqa: B018 - creating the class registers it with Keras
    return tf.keras.models.load_model(str(path), safe_mode=True, compile=compile)
