"""A small clothing classifier trained from scratch on the course's photos, saved in the course model's format.

Notebook 00 tells the story and calls these helpers. The saved model is what the course's clients expect of
xception_v4_large_08_0.894.h5: Keras-2 HDF5, input `input_8` (-1x299x299x3 float32, Xception's scaling
x/127.5 - 1 done by the client), output `dense_7` (ten logits, the classes in contract.CLASSES' order). Inside,
the photo is brought down to a small size first, since the time per epoch is set by that size, not by the 299 of
the contract.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras
from keras_image_helper import create_preprocessor

from contract import CLASSES, IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME

layers = keras.layers
SPLITS = ("train", "validation", "test")
# The course's dataset (module 8), CC0: a learner clones it beside this repository.
DATASET_REPOSITORY = "https://github.com/alexeygrigorev/clothing-dataset-small"
# The course's model, for comparison: its file name carries its validation accuracy (epoch 8, 0.894).
COURSE_MODEL = {"file": "xception_v4_large_08_0.894.h5", "validation_accuracy": 0.894}


class DatasetMissing(FileNotFoundError):
    """The dataset's folder is not where the notebook was told to look; the message says how to get it."""


@dataclass
class Split:
    """One split's photos in a fixed order (by class, then name) and their class indices."""

    name: str
    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def check_dataset(folder: Path | str) -> dict[str, dict[str, int]]:
    """Photos per split and class; raises DatasetMissing naming what is missing and how to get it."""
    folder = Path(folder)
    missing = [f"{split}/{name}" for split in SPLITS for name in CLASSES if not (folder / split / name).is_dir()]
    if missing:
        raise DatasetMissing(
            f"dataset_dir={str(folder)!r} lacks {len(missing)} of the {len(SPLITS) * len(CLASSES)} folders "
            f"<split>/<class> (the first: {missing[0]}). Clone the course's photos with "
            f"`git clone {DATASET_REPOSITORY}` and pass that folder: make train CLOTHING_DATASET=/path/to/it"
        )
    counts = {split: {name: len(list((folder / split / name).glob("*.jpg"))) for name in CLASSES} for split in SPLITS}
    empty = [f"{split}/{name}" for split in SPLITS for name in CLASSES if not counts[split][name]]
    if empty:
        raise DatasetMissing(f"dataset_dir={str(folder)!r}: no .jpg photos in {', '.join(empty)}")
    return counts


def list_split(folder: Path | str, split: str, per_class: int | None = None) -> Split:
    """The split's photos (the first `per_class` of each class, when given), labelled by their folder."""
    paths, labels = [], []
    for index, name in enumerate(CLASSES):
        photos = sorted((Path(folder) / split / name).glob("*.jpg"))[:per_class]
        paths += photos
        labels += [index] * len(photos)
    return Split(split, paths, np.array(labels, dtype=np.int64))


def preprocess(path: Path) -> np.ndarray:
    """One photo as the course's clients send it: keras-image-helper's 'xception' preprocessor (PIL, NEAREST to
    299x299, x/127.5 - 1), a 299x299x3 float32 array."""
    return create_preprocessor("xception", target_size=IMAGE_SIZE).from_path(str(path))[0]


def photo_batches(paths: list[Path], batch_size: int = 64):
    """Preprocessed photos, `batch_size` at a time (two threads: PIL releases the GIL while it decodes)."""
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), batch_size):
            yield np.stack(list(pool.map(preprocess, paths[start : start + batch_size])))


def downscale_layers(image_size: int) -> list:
    """The model's first two layers: 299 -> 2*image_size (bilinear), then 2x2 averages -> image_size. One bilinear
    step straight to image_size would take each pixel from 4 of the 9 or so input pixels it covers."""
    return [
        layers.Resizing(2 * image_size, 2 * image_size, name="resize"),
        layers.AveragePooling2D(2, name="average_2x2"),
    ]


def load_for_training(split: Split, image_size: int) -> np.ndarray:
    """The split's photos after the model's resize layer (2*image_size px), where augmentation works: training
    sees each photo as the served model sees it after that layer."""
    resize = downscale_layers(image_size)[0]
    return np.concatenate([resize(batch).numpy() for batch in photo_batches(split.paths)])


def average_2x2(images):
    """The model's 2x2 averages (its AveragePooling2D layer), for training batches: the same means, summed in
    another order, several times faster than that layer's kernel on three channels."""
    shape = tf.shape(images)
    blocks = tf.reshape(images, [shape[0], shape[1] // 2, 2, shape[2] // 2, 2, 3])
    return tf.reduce_mean(blocks, axis=[2, 4])


# ---- the network ------------------------------------------------------------------------------------------------


def build_network(
    image_size: int = 96, filters=(64, 128, 256, 512), top: int = 768, dropout: float = 0.3, pooling="max", seed=1
):
    """The network that trains: image_size px in (the photo after the model's resize and 2x2 averages), ten
    logits out. Its trunk, dropout and `dense_7` are the saved model's own layers (course_model)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="downscaled")
    features = build_trunk(image_size, filters, top, pooling)(inputs)
    logits = layers.Dense(len(CLASSES), name=OUTPUT_NAME)(layers.Dropout(dropout, name="dropout")(features))
    return keras.Model(inputs, logits, name="small_xception_training")


def build_trunk(image_size: int, filters, top: int, pooling: str = "max") -> keras.Model:
    """image_size px in, a vector of `top` features out: the part a photo and its mirror image share.

    Xception's pattern at a small size: an entry convolution, then blocks of two separable convolutions (a 3x3
    filter per channel, then a 1x1 mix of the channels) and a 3x3 max pool with a stride of 2, each block added to
    a strided 1x1 convolution of its input (the residual shortcut), then one more separable convolution and global
    average pooling. `pooling="stride"` halves the size in the second convolution instead of a pool: a quarter of
    that convolution's work (0.7 s of CPU per batch of 32 here instead of 1.2), and less accuracy (80.6 % on the test
    photos after 30 epochs, against the max pool's 82.8 % after 24 and 85.5 % after 36; trained/clothing-small.json
    says which one the committed model has)."""
    if pooling not in ("max", "stride"):
        raise ValueError(f"pooling is 'max' or 'stride', not {pooling!r}")
    inputs = keras.Input((image_size, image_size, 3))
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.Activation("relu", name="entry")(layers.BatchNormalization()(x))
    for block, width in enumerate(filters, 1):
        shortcut = layers.BatchNormalization()(layers.Conv2D(width, 1, strides=2, padding="same", use_bias=False)(x))
        x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
        stride = 1 if pooling == "max" else 2
        x = layers.BatchNormalization()(layers.SeparableConv2D(width, 3, stride, padding="same", use_bias=False)(x))
        if pooling == "max":
            x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, shortcut], name=f"block_{block}")
    x = layers.SeparableConv2D(top, 3, padding="same", use_bias=False)(x)
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name="trunk")


def augmenter(rotation: float = 0.05, zoom: float = 0.15, shift: float = 0.1, seed: int = 1):
    """A function that changes each photo of a batch at random, as it could have been taken (training batches
    only, never part of the saved model): mirrored or not, turned by up to `rotation` of a full circle, zoomed in or
    out by up to `zoom` and shifted by up to `shift` of its size. The four make one affine map per photo, applied
    in one bilinear pass: Keras' RandomFlip, RandomRotation, RandomZoom and RandomTranslation make three, each
    blurring the last, and took 220 ms of CPU per batch of 32 photos at 192 px here against 72. Edges are filled
    from their nearest pixels, as the photos' plain backgrounds would continue."""
    generator = tf.random.Generator.from_seed(seed)

    def augment(images):
        count, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        size = tf.cast(tf.stack([width, height]), tf.float32)
        mirror = tf.where(generator.uniform([count]) < 0.5, -1.0, 1.0)
        angle = generator.uniform([count], -rotation, rotation) * 2 * math.pi
        scale = generator.uniform([count], 1 - zoom, 1 + zoom)  # output pixels to input pixels: above 1 zooms out
        moved = generator.uniform([count, 2], -shift, shift) * size
        # Input coordinates of each output pixel (x, y), about the centre c: scale * rotate(mirror(x - c)) + c + moved.
        cos, sin = scale * tf.cos(angle), scale * tf.sin(angle)
        a0, a1, b0, b1 = cos * mirror, -sin, sin * mirror, cos
        centre = (size - 1) / 2
        a2 = centre[0] + moved[:, 0] - (a0 * centre[0] + a1 * centre[1])
        b2 = centre[1] + moved[:, 1] - (b0 * centre[0] + b1 * centre[1])
        zeros = tf.zeros([count])
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.stack([height, width]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )

    return augment


def batches(x: np.ndarray, labels: np.ndarray, batch_size: int, augment=None, seed: int = 1) -> tf.data.Dataset:
    """(images averaged 2x2 down to the network's size, one-hot labels) in batches from the photos at twice that
    size; shuffled and augmented (before the averages) anew each epoch when `augment` is given."""
    data = tf.data.Dataset.from_tensor_slices((x, np.eye(len(CLASSES), dtype=np.float32)[labels]))
    if augment is not None:
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

    def prepare(images, y):
        return average_2x2(augment(images) if augment is not None else images), y

    return data.batch(batch_size).map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class Progress(keras.callbacks.Callback):
    """One line per epoch: the losses and accuracies, the epoch's time and the time so far, and the CPU time the
    epoch took (all threads), which says how much of the machine training had, when others share it."""

    def on_train_begin(self, logs=None):
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started, self.epoch_cpu = time.monotonic(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        now, cpu = time.monotonic(), time.process_time() - self.epoch_cpu
        print(
            f"epoch {epoch + 1:>2}/{self.params['epochs']}: loss {logs['loss']:.3f}, accuracy {logs['accuracy']:.3f}; "
            f"validation loss {logs['val_loss']:.3f}, accuracy {logs['val_accuracy']:.3f}; "
            f"{now - self.epoch_started:.0f} s, {cpu:.0f} s of CPU ({(now - self.started) / 60:.1f} min in all)",
            flush=True,
        )


def train(network, train_data, validation_data, *, epochs, steps, learning_rate, weight_decay, label_smoothing):
    """AdamW with a cosine decay from `learning_rate` to 0 over `epochs` x `steps`, cross-entropy on the logits
    with label smoothing; batch norm's scales and offsets and the biases are not decayed. Returns the history."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epochs * steps)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    network.compile(optimizer, loss, metrics=["accuracy"])
    history = network.fit(train_data, validation_data=validation_data, epochs=epochs, verbose=0, callbacks=[Progress()])
    return history.history


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


# ---- the course's format ----------------------------------------------------------------------------------------


def mirror(x, image_size: int):
    """`x` (-1 x rows x columns x channels) with its columns in reverse order, from standard layers only, so that
    any Keras and TF Serving read it: the columns moved last, a fixed 0/1 matrix that reverses them (each output is
    one input times 1 plus zeros: exact), and moved back."""
    reverse = layers.Dense(image_size, use_bias=False, trainable=False, name="mirror_columns")
    y = layers.Permute((1, 3, 2), name="mirror_back")(reverse(layers.Permute((1, 3, 2), name="columns_last")(x)))
    reverse.set_weights([np.eye(image_size, dtype=np.float32)[::-1]])
    return y


def course_model(network: keras.Model, image_size: int, test_time_flip: bool = True) -> keras.Model:
    """The trained layers behind the course's contract: `input_8` 299x299x3 (Xception-scaled) -> resize ->
    trunk -> `dense_7`. With `test_time_flip`, the features of the photo and of its mirror image are averaged
    before the logits (the mean of the two answers, as the last layer is linear): served, it is the same model."""
    inputs = keras.Input((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), name=INPUT_NAME)
    resize, average = downscale_layers(image_size)
    x = average(resize(inputs))
    trunk = network.get_layer("trunk")
    features = trunk(x)
    if test_time_flip:
        features = layers.Average(name="photo_and_mirror")([features, trunk(mirror(x, image_size))])
    logits = network.get_layer(OUTPUT_NAME)(network.get_layer("dropout")(features))
    return keras.Model(inputs, logits, name="clothing_small")


def save_h5(model: keras.Model, path: Path | str) -> Path:
    """Keras-2 HDF5, as the course saved its model (without the optimizer's state: nothing serves it). tf-keras
    warns that HDF5 is its legacy format (the course's format is the point here) and that the model, never
    compiled, has no metrics: both are silenced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
            model.save(path, save_format="h5", include_optimizer=False)
    finally:
        logger.setLevel(level)
    return path


def load_h5(path: Path | str) -> keras.Model:
    return keras.models.load_model(path, compile=False)


def sha256_of(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- evaluation -------------------------------------------------------------------------------------------------


def predict_photos(model: keras.Model, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Logits for each photo, preprocessed as the course's clients do (keras-image-helper): what a server of
    `model` answers for them."""
    return np.concatenate([model(batch, training=False).numpy() for batch in photo_batches(paths, batch_size)])


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rows: the true class; columns: the predicted one."""
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def scores(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Accuracy, per-class counts and the confusion matrix, as plain numbers (JSON)."""
    matrix = confusion_matrix(labels, logits.argmax(axis=1))
    correct = int(np.trace(matrix))
    return {
        "accuracy": correct / len(labels),
        "correct": correct,
        "photos": len(labels),
        "per_class": {name: [int(matrix[i, i]), int(matrix[i].sum())] for i, name in enumerate(CLASSES)},
        "confusion": matrix.tolist(),
    }


def main_confusions(matrix, count: int = 6) -> list[tuple[str, str, int]]:
    """The largest off-diagonal cells: (true class, taken for, photos)."""
    matrix = np.asarray(matrix)
    cells = [(int(matrix[i, j]), i, j) for i in range(len(CLASSES)) for j in range(len(CLASSES)) if i != j]
    return [(CLASSES[i], CLASSES[j], n) for n, i, j in sorted(cells, reverse=True)[:count] if n]


def plot_curves(history: dict):
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(11, 3.6))
    epochs = range(1, len(history["loss"]) + 1)
    for axes, key in ((loss, "loss"), (accuracy, "accuracy")):
        axes.plot(epochs, history[key], label="training (augmented)")
        axes.plot(epochs, history[f"val_{key}"], label="validation")
        axes.set(xlabel="epoch", title=key)
        axes.grid(alpha=0.3)
    accuracy.legend()
    figure.tight_layout()
    return figure


def plot_confusion(matrix, title: str):
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(6.4, 5.6))
    axes.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            axes.text(j, i, n, ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ticks = range(len(CLASSES))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    axes.set_xticklabels(CLASSES, rotation=45, ha="right")
    axes.set_yticklabels(CLASSES)
    figure.tight_layout()
    return figure


def write_summary(path: Path | str, summary: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
