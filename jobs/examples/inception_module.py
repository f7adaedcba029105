"""The course's homework: an Inception module written by hand, trained by distrain unchanged.

The file is what a notebook cell becomes: plain tf.keras, no distrain import. distrain calls
``build(input_shape, num_classes, **model.params)`` inside the strategy's scope (see
jobs/examples/inception.yaml, which names it as ``model.name: inception_module.py:build``).

    distrain models --describe jobs/examples/inception_module.py:build         its size
    distrain train jobs/examples/inception.yaml                                 one machine
    distrain train jobs/examples/inception.yaml --set distribute.strategy=mirrored   all local GPUs
    distrain slurm render jobs/examples/inception.yaml --nodes 2 --gpus-per-node 4 > incep.sh && sbatch incep.sh

Source of the module: Szegedy et al. 2014, "Going Deeper with Convolutions" (Fig. 2b): four
branches, 1x1 | 1x1 → 3x3 | 1x1 → 5x5 | 3x3 max pool → 1x1, concatenated on the channels.
"""
import tensorflow as tf

layers = tf.keras.layers


def inception_module(x, f1, f3_reduce, f3, f5_reduce, f5, pool_proj, kernel_regularizer=None, name="inception"):
    """One Inception module (Fig. 2b): the four branches, concatenated on the channel axis."""
    def conv(y, filters, size, suffix):
        return layers.Conv2D(filters, size, padding="same", activation="relu",
                             kernel_regularizer=kernel_regularizer, name=f"{name}_{suffix}")(y)

    branch1 = conv(x, f1, 1, "1x1")
    branch3 = conv(conv(x, f3_reduce, 1, "3x3_reduce"), f3, 3, "3x3")
    branch5 = conv(conv(x, f5_reduce, 1, "5x5_reduce"), f5, 5, "5x5")
    pooled = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch_pool = conv(pooled, pool_proj, 1, "pool_proj")
    return layers.Concatenate(name=f"{name}_concat")([branch1, branch3, branch5, branch_pool])


def build(input_shape, num_classes, *, filters=16, modules=2, dropout=0.0, kernel_regularizer=None):
    """A small GoogLeNet: a 3x3 stem, ``modules`` Inception modules, global pooling, softmax.

    Args:
        input_shape: one image's shape, e.g. (32, 32, 3) (distrain passes the data's).
        num_classes: the number of classes (distrain passes the data's).
        filters: the 1x1 branch's filters; the other branches scale with it as in module 3a.
        modules: how many Inception modules to stack.
        dropout: dropout before the classifier (0: none).
        kernel_regularizer: distrain passes train.l1/train.l2 here.
    """
    inputs = tf.keras.Input(shape=input_shape)
    x = layers.Conv2D(2 * filters, 3, padding="same", activation="relu",
                      kernel_regularizer=kernel_regularizer, name="stem")(inputs)
    for i in range(modules):
        # Module 3a's proportions (64, 96, 128, 16, 32, 32) with 64 → filters.
        f = filters
        x = inception_module(x, f, f * 3 // 2, 2 * f, max(1, f // 4), f // 2, f // 2,
                             kernel_regularizer, name=f"inception_{i + 1}")
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_regularizer=kernel_regularizer)(x)
    return tf.keras.Model(inputs, outputs, name="my_inception")
