"""crn_tf from Python, the same on every Keras backend: load a trained CRN, turn layouts into photos.

    import crn_tf

    crn = crn_tf.LayoutToPhoto.from_model_dir("runs/toy")     # a model_dir of crn-train or crn-import-original
    photos = crn.predict("examples/layouts/cityscapes_0.png")  # uint8 [1, H, W, 3]
    photos = crn.predict(label_ids)                            # uint8 [N, H, W] or [H, W] ids -> [N, H, W, 3]

A model_dir's checkpoint is read with crn_tf.bundle (NumPy), so this imports no TensorFlow on JAX
(`KERAS_BACKEND=jax`): what the GPU machines that have JAX but no TensorFlow need. The photos are
computed by Keras' `predict_on_batch` (a `tf.function` on TensorFlow, `jax.jit` on JAX).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from crn_tf import labels
from crn_tf.config import CHECKPOINT_PREFIX, CONFIG_FILENAME, CRNConfig

_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)\.index$")


def latest_checkpoint_prefix(model_dir: str) -> str:
    """The newest `ckpt-N` of a model_dir whose index file exists (by its step number N)."""
    try:
        names = os.listdir(model_dir)
    except OSError as e:
        raise ValueError(f"{model_dir}: cannot list the model_dir ({e.strerror})") from e
    steps = sorted(int(m.group(1)) for m in map(_CHECKPOINT.match, names) if m)
    if not steps:
        raise ValueError(f"{model_dir}: no checkpoint found (expected ckpt-N.index files)")
    return os.path.join(model_dir, f"{CHECKPOINT_PREFIX}-{steps[-1]}")


def read_config(model_dir: str) -> CRNConfig:
    """The CRNConfig of a model_dir (`crn_config.json`), with an error naming the file."""
    path = os.path.join(model_dir, CONFIG_FILENAME)
    if not os.path.exists(path):
        raise ValueError(f"{model_dir} is not a crn_tf model_dir: {CONFIG_FILENAME} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return CRNConfig.from_dict(json.load(f))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid CRN config ({e})") from e


def tf_checkpoint_key(variable_path: str) -> str:
    """The key the TensorFlow trainer's checkpoint stores a CRN variable under, without its
    `/.ATTRIBUTES/VARIABLE_VALUE` suffix: `crn/module_4x8/conv1/kernel` -> `model/module_4x8/conv1/_kernel`
    (Keras 3 tracks a layer's kernel as `_kernel`; biases and norms' gamma and beta by their names)."""
    inner = variable_path.split("/", 1)[1]
    parent, _, name = inner.rpartition("/")
    return f"model/{parent}/{'_kernel' if name == 'kernel' else name}"


def find_variable_key(reader, variable_path: str) -> str | None:
    """The checkpoint key of a CRN variable (by its Keras path) in a crn_tf.bundle.BundleReader, found
    through the checkpoint's object graph (a trainer's checkpoint may name the tensor by another path)."""
    path = tf_checkpoint_key(variable_path)
    key = reader.variable_key(path)
    if key is None and path.endswith("/_kernel"):  # a Keras that tracks the kernel by its own name
        key = reader.variable_key(path[: -len("_kernel")] + "kernel")
    return key


def load_model(path: str):
    """A CascadedRefinementNetwork with the weights of a model_dir's newest checkpoint, of a checkpoint
    prefix inside one (`runs/toy/ckpt-400`), or of a `.keras` file, on the current Keras backend.

    Raises:
        ValueError: not a model_dir, no checkpoint, or a checkpoint that lacks a weight or holds
            one of another shape (naming the file and the weight).
    """
    from crn_tf.bundle import BundleReader
    from crn_tf.model import CascadedRefinementNetwork

    if path.endswith(".keras"):
        import keras

        model = keras.models.load_model(path)
        if not isinstance(model, CascadedRefinementNetwork):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a CascadedRefinementNetwork")
        return model
    model_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    model = CascadedRefinementNetwork(read_config(model_dir))
    if os.path.isdir(path):
        prefix = latest_checkpoint_prefix(path)
    elif os.path.exists(path + ".index"):
        prefix = path
    else:
        raise ValueError(f"{path}: neither a model_dir nor a checkpoint prefix ({path}.index not found)")
    reader = BundleReader(prefix)
    for variable in model.weights:
        key = find_variable_key(reader, variable.path)
        if key is None:
            path = tf_checkpoint_key(variable.path)
            raise ValueError(f"{prefix}: the checkpoint has no value for {variable.path} (object path {path})")
        value = reader.read(key)
        if tuple(value.shape) != tuple(variable.shape):
            shape = tuple(variable.shape)
            raise ValueError(f"{prefix}: {key} has shape {value.shape}, the model's {variable.path} {shape}")
        variable.assign(value)
    return model


def one_hot(label_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """Train ids [..., H, W] -> float32 one-hot [..., H, W, num_classes + 1], void last (NumPy; ids
    outside 0..num_classes-1 are void), as crn_tf.labels.one_hot does in a TensorFlow graph."""
    ids = np.asarray(label_ids).astype(np.int64)
    classes = (ids[..., None] == np.arange(num_classes)).astype(np.float32)
    return np.concatenate([classes, 1.0 - classes.sum(-1, keepdims=True)], axis=-1)


class LayoutToPhoto:
    """A trained CRN as a function from layouts to photos (keras-hub's `from_preset` / `predict` shape).

    Attributes:
        model: the CascadedRefinementNetwork (a Keras model).
        label_space: the model's label space (colour layouts are decoded with it).
        num_outputs: k, photos per layout.
    """

    def __init__(self, model):
        self.model = model
        self.config: CRNConfig = model.crn_config
        self.label_space = self.config.get_label_space()
        self.num_outputs = self.config.num_outputs

    @classmethod
    def from_model_dir(cls, path: str) -> LayoutToPhoto:
        """From a model_dir (newest checkpoint) or a checkpoint prefix in one; see `load_model`."""
        return cls(load_model(path))

    def label_ids(self, layout) -> np.ndarray:
        """A layout as uint8 ids [N, H, W]: ids [H, W] / [N, H, W], a PNG path (colour, palette or id
        PNG, see crn_tf.labels.decode_label_image) or a list of such paths of one size."""
        if isinstance(layout, (str, os.PathLike)):
            layout = [layout]
        if isinstance(layout, Sequence) and layout and isinstance(layout[0], (str, os.PathLike)):
            images = []
            for path in layout:
                with open(path, "rb") as f:
                    images.append(labels.decode_label_image(f.read(), self.label_space, source=os.fspath(path)))
            if len({im.shape for im in images}) > 1:
                raise ValueError(f"layouts of different sizes in one call: {[im.shape for im in images]}")
            return np.stack(images)
        ids = np.asarray(layout)
        if ids.ndim == 2:
            ids = ids[None]
        if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"layout ids must be integers [H, W] or [N, H, W], got {ids.dtype} {ids.shape}")
        return ids

    def predict(self, layout) -> np.ndarray:
        """Photos of `layout` (see `label_ids`): uint8 [N, H, W, 3], or [N, k, H, W, 3] for a model
        with k > 1 outputs. Height and width must be multiples of the model's size_multiple."""
        from keras import ops

        from crn_tf.serving_contract import fits_size_multiple

        ids = self.label_ids(layout)
        h, w = ids.shape[1:]
        m = self.config.size_multiple
        if not fits_size_multiple(h, w, m):
            raise ValueError(
                f"layout is {h}x{w}; CRN {self.config.name!r} needs height and width that are positive multiples of {m}"
            )
        images = ops.convert_to_numpy(self.model.predict_on_batch(one_hot(ids, self.config.num_classes)))
        photos = np.round(np.clip(images, 0.0, 255.0)).astype(np.uint8)  # [N, H, W, 3k]
        if self.num_outputs == 1:
            return photos
        return photos.reshape(*photos.shape[:3], self.num_outputs, 3).transpose(0, 3, 1, 2, 4)
