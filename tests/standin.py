"""A small stand-in for the course model, built the way the course built xception_v4_large_08_0.894.h5.

The course model is Xception (ImageNet weights, no top) used as a nested sub-model, then
GlobalAveragePooling2D -> Dense(100, relu) -> Dropout(0.2) -> Dense(10), saved as HDF5 by TF 2.x
Keras 2. Its input layer is `input_8` and its output layer `dense_7`. The stand-in keeps that
structure, the names and the 299x299x3 input, with a few Xception-style blocks (entry conv, separable
convolutions with batch norm, strided residual shortcuts) at a reduced width so the suite stays fast.
It is saved with tf-keras (Keras 2), exactly as the course file was.
"""

from __future__ import annotations

from pathlib import Path

from contract import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME


def build_standin(width: int = 8, seed: int = 7):
    """The stand-in as a tf-keras (Keras 2) model with random weights."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    shape = (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)

    base_in = keras.Input(shape=shape)
    x = layers.Conv2D(width, 3, strides=2, use_bias=False)(base_in)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for filters in (2 * width, 4 * width):
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
        shortcut = layers.BatchNormalization()(shortcut)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, shortcut])
    base_model = keras.Model(base_in, x, name="xception")
    base_model.trainable = False

    inputs = keras.Input(shape=shape, name=INPUT_NAME)
    base = base_model(inputs, training=False)
    vectors = layers.GlobalAveragePooling2D()(base)
    inner = layers.Dense(100, activation="relu")(vectors)
    drop = layers.Dropout(0.2)(inner)
    outputs = layers.Dense(10, name=OUTPUT_NAME)(drop)
    return keras.Model(inputs, outputs)


def save_standin_h5(path: Path, width: int = 8) -> Path:
    """Build the stand-in and save it as Keras-2 HDF5 at `path`."""
    model = build_standin(width)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path, save_format="h5")
    return path


def build_xception_size(seed: int = 1):
    """Xception at the course model's full size and head, random weights: a model that costs what the course's
    does per image (about 130-360 ms on 2 cores), for benchmarks where compute per image matters."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    shape = (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)
    base = keras.applications.Xception(weights=None, input_shape=shape, include_top=False)
    inputs = keras.Input(shape=shape, name=INPUT_NAME)
    vectors = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    inner = keras.layers.Dense(100, activation="relu")(vectors)
    outputs = keras.layers.Dense(10, name=OUTPUT_NAME)(keras.layers.Dropout(0.2)(inner))
    return keras.Model(inputs, outputs)


def save_xception_size_h5(path: Path) -> Path:
    """build_xception_size() as Keras-2 HDF5, for notebook 01 to convert as it converts the course model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    build_xception_size().save(path, save_format="h5")
    return path


def export_float32_only(keras_model, directory: Path, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME):
    """`keras_model` as a SavedModel in `directory` with one signature, serving_default, float32 in, as an older
    export or one made by hand (without notebook 01's serving_uint8), under the given tensor names."""
    import tensorflow as tf

    class Float32Only(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = keras_model

        @tf.function(
            input_signature=[tf.TensorSpec([None, IMAGE_SIZE[1], IMAGE_SIZE[0], 3], tf.float32, name=input_name)]
        )
        def serve(self, images):
            return {output_name: self.model(images, training=False)}

    module = Float32Only()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
