"""Tests for distrain.models: the registry, shapes, parameter counts and regularization."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import distrain  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import pytest
import tensorflow as tf

from distrain.models import MODELS, ModelEntry, build_model, model_params

keras = tf.keras
layers = keras.layers
REPO = Path(__file__).resolve().parents[1]

# Published parameter count of MobileNetV2 1.0 at 224x224x3 with 1000 classes, as counted by
# tf.keras.applications.MobileNetV2(weights=None).
MOBILENET_V2_1_0_PARAMS = 3_538_984


@pytest.fixture(autouse=True)
def _clear_keras_session():
    yield
    keras.backend.clear_session()


def count_layers(model, layer_type):
    # Exact type, so that e.g. DepthwiseConv2D is not counted as a Conv2D and vice versa.
    return sum(type(layer) is layer_type for layer in model.layers)


def test_importing_models_does_not_import_tensorflow():
    code = "import distrain.models, sys; assert 'tensorflow' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_registry_names_and_default_shapes():
    assert list(MODELS) == ["mlp", "cnn", "residual", "inception", "mobilenet_v2"]
    assert {name: entry.default_input_shape for name, entry in MODELS.items()} == {
        "mlp": (28, 28, 1),
        "cnn": (28, 28, 1),
        "residual": (32, 32, 3),
        "inception": (32, 32, 3),
        "mobilenet_v2": (32, 32, 3),
    }
    for name, entry in MODELS.items():
        assert isinstance(entry, ModelEntry)
        assert entry.name == name
        assert entry.description
        assert "Source" in entry.builder.__doc__
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["mlp"].name = "other"


def test_model_params():
    assert model_params("mlp") == {"units": 128, "dropout": 0.2}
    assert model_params("cnn") == {"filters": 64, "dropout": 0.0}
    assert model_params("residual") == {"width": 32, "blocks": 3, "dropout": 0.0}
    assert model_params("inception") == {"width": 1.0, "modules": 2, "dropout": 0.4}
    assert model_params("mobilenet_v2") == {"alpha": 1.0, "dropout": 0.0}


def test_unknown_model_is_a_value_error_listing_the_models():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mobilenet_v2"):
        model_params("resnet")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", (32, 32, 3), 10)


def test_unknown_param_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="unknown parameter.*widht.*valid parameters.*width=32"):
        build_model("residual", (32, 32, 3), 10, widht=16)
    # The regularizer is set through l1/l2, never directly.
    with pytest.raises(TypeError, match="kernel_regularizer"):
        build_model("mlp", (28, 28, 1), 10, kernel_regularizer=keras.regularizers.L2(1.0))


@pytest.mark.parametrize(
    "name, input_shape, num_classes, params",
    [
        ("mlp", (28, 28, 1), 10, {}),
        ("mlp", (32, 32, 3), 100, {}),
        ("cnn", (28, 28, 1), 10, {}),
        ("cnn", (32, 32, 3), 7, {"dropout": 0.5}),
        ("residual", (32, 32, 3), 10, {}),
        ("residual", (28, 28, 1), 2, {"width": 8, "blocks": 1}),
        ("inception", (32, 32, 3), 10, {}),
        ("inception", (28, 28, 1), 5, {"width": 0.25, "modules": 9}),
        ("mobilenet_v2", (32, 32, 3), 10, {}),
        ("mobilenet_v2", (33, 47, 1), 3, {"alpha": 0.35}),
    ],
)
def test_output_shape_name_and_not_compiled(name, input_shape, num_classes, params):
    model = build_model(name, input_shape, num_classes, **params)
    assert model.name == name
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == (None, num_classes)
    assert model.optimizer is None


def test_mlp_parameter_count():
    # Dense 784 -> 128 plus bias, Dense 128 -> 10 plus bias.
    assert build_model("mlp", (28, 28, 1), 10).count_params() == 784 * 128 + 128 + 128 * 10 + 10
    assert build_model("mlp", (28, 28, 1), 10).count_params() == 101_770
    assert build_model("mlp", (28, 28, 1), 10, units=64).count_params() == (
        784 * 64 + 64 + 64 * 10 + 10
    )


def test_cnn_parameter_count():
    # Conv 3x3x1 -> 64 plus bias; "same" padding keeps 28x28, the 2x2 pool halves it to 14x14.
    conv = 3 * 3 * 1 * 64 + 64
    dense = 14 * 14 * 64 * 10 + 10
    assert build_model("cnn", (28, 28, 1), 10).count_params() == conv + dense == 126_090
    model = build_model("cnn", (32, 32, 3), 5, filters=16, dropout=0.3)
    assert model.count_params() == (3 * 3 * 3 * 16 + 16) + (16 * 16 * 16 * 5 + 5)
    assert count_layers(model, layers.Dropout) == 1
    assert count_layers(build_model("cnn", (28, 28, 1), 10), layers.Dropout) == 0


def test_residual_parameter_count_and_shortcuts():
    model = build_model("residual", (8, 8, 3), 10, width=8, blocks=2)
    bn = 4 * 8  # gamma, beta, moving mean, moving variance per channel
    stem = 3 * 3 * 3 * 8 + bn  # convolutions have no bias: BN follows
    block = 2 * (3 * 3 * 8 * 8 + bn)
    dense = 8 * 10 + 10  # after global average pooling: 8 features
    assert model.count_params() == stem + 2 * block + dense == 2_770
    assert count_layers(model, layers.Add) == 2
    assert count_layers(model, layers.Conv2D) == 1 + 2 * 2
    assert count_layers(model, layers.BatchNormalization) == 1 + 2 * 2


def test_inception_parameter_count():
    # width 1/8: stem 192 -> 24 filters; module 3a (64, 96 -> 128, 16 -> 32, pool 32) becomes
    # (8, 12 -> 16, 2 -> 4, pool 4). Every convolution has a bias.
    model = build_model("inception", (8, 8, 3), 10, width=0.125, modules=1)
    stem = 3 * 3 * 3 * 24 + 24
    branch_1x1 = 24 * 8 + 8
    branch_3x3 = (24 * 12 + 12) + (3 * 3 * 12 * 16 + 16)
    branch_5x5 = (24 * 2 + 2) + (5 * 5 * 2 * 4 + 4)
    branch_pool = 24 * 4 + 4
    dense = (8 + 16 + 4 + 4) * 10 + 10
    expected = stem + branch_1x1 + branch_3x3 + branch_5x5 + branch_pool + dense
    assert model.count_params() == expected == 3_600
    assert count_layers(model, layers.Concatenate) == 1


def test_inception_modules_follow_googlenet_table_1():
    model = build_model("inception", (32, 32, 3), 10)
    # Output channels of modules 3a and 3b in the paper: 256 and 480.
    assert model.get_layer("inception_3a_concat").output_shape[-1] == 256
    assert model.get_layer("inception_3b_concat").output_shape[-1] == 480
    assert count_layers(model, layers.Concatenate) == 2
    assert count_layers(model, layers.Dropout) == 1
    keras.backend.clear_session()

    model = build_model("inception", (32, 32, 3), 10, modules=9)
    assert count_layers(model, layers.Concatenate) == 9
    assert model.get_layer("inception_5b_concat").output_shape[-1] == 1024
    # Stem pool 32 -> 16, the pools before 4a and 5a: 16 -> 8 -> 4.
    assert model.get_layer("inception_5b_concat").output_shape[1:3] == (4, 4)
    for modules in (0, 10):
        with pytest.raises(ValueError, match="modules"):
            build_model("inception", (32, 32, 3), 10, modules=modules)


def test_mobilenet_v2_matches_published_parameter_count():
    model = build_model("mobilenet_v2", (224, 224, 3), 1000)
    assert model.count_params() == MOBILENET_V2_1_0_PARAMS
    assert count_layers(model, layers.DepthwiseConv2D) == 17  # 1+2+3+4+3+3+1 rows of Table 2
    assert count_layers(model, layers.Add) == 10
    assert model.get_layer("conv_last").output_shape == (None, 7, 7, 1280)


@pytest.mark.parametrize("alpha", [0.5, 1.4])
def test_mobilenet_v2_width_multiplier_matches_keras_reference(alpha):
    ours = build_model("mobilenet_v2", (224, 224, 3), 1000, alpha=alpha).count_params()
    keras.backend.clear_session()
    reference = keras.applications.MobileNetV2(alpha=alpha, weights=None).count_params()
    assert ours == reference


def test_mobilenet_v2_small_input_and_dropout():
    model = build_model("mobilenet_v2", (32, 32, 3), 10, dropout=0.2)
    # Five stride-2 layers take 32x32 down to 1x1.
    assert model.get_layer("conv_last").output_shape == (None, 1, 1, 1280)
    assert count_layers(model, layers.Dropout) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_regularization_adds_one_loss_per_kernel(name):
    shape = MODELS[name].default_input_shape
    model = build_model(name, shape, 10, l2=1e-4)
    # Depthwise kernels of MobileNetV2 are deliberately left unregularized.
    kernels = count_layers(model, layers.Conv2D) + count_layers(model, layers.Dense)
    assert len(model.losses) == kernels > 0
    regularizer = model.layers[-1].kernel_regularizer
    assert (float(regularizer.l1), float(regularizer.l2)) == pytest.approx((0.0, 1e-4))
    keras.backend.clear_session()

    assert len(build_model(name, shape, 10, l1=1e-5).losses) == kernels
    keras.backend.clear_session()

    model = build_model(name, shape, 10)
    assert model.losses == []
    assert all(getattr(layer, "kernel_regularizer", None) is None for layer in model.layers)


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_parameter_count_is_the_built_models(name):
    from distrain.models import REGISTRY_CLASSES

    entry = MODELS[name]
    assert build_model(name, entry.default_input_shape, REGISTRY_CLASSES).count_params() == entry.params
