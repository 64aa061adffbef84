"""VGG-19 feature extractor for the perceptual loss (paper Sec. 3.3): the image and conv{1..5}_2.

The original code uses the MatConvNet VGG-19 (RGB order) with *average* pooling on RGB in [0, 255]
minus the ImageNet mean. Keras' VGG-19 ImageNet weights are the same network in BGR order; we feed
them BGR-minus-mean, which is the same function, and rebuild the graph with average pools.

Weights:
- `imagenet`: Keras' ImageNet weights (downloaded once on first use and cached by Keras, in
  ~/.keras/models; nothing here downloads otherwise).
- a path: a Keras VGG-19 weights file (e.g. `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`,
  or a `.weights.h5` saved from `keras.applications.VGG19(include_top=False)`).
- `none`: seeded random weights. The loss still trains a network but is not the paper's perceptual
  loss: expect much worse images. Useful for tests and for machines without the weights.
"""

from __future__ import annotations

import os

import keras
import numpy as np
from keras import ops

from crn_tf.config import LOSS_LAYERS
from crn_tf.ops import conv3x3, fast_convolutions, glorot_uniform, recompute

# ImageNet mean used by the original (RGB order) and by Keras' caffe-style weights (BGR order).
VGG_MEAN_RGB = (123.68, 116.779, 103.939)

# (block, number of 3x3 convolutions, filters) of VGG-19, up to block 5.
_VGG19_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))
FEATURE_LAYERS = LOSS_LAYERS[1:]  # block{1..5}_conv2
# Number of 2x2 pools before each loss layer: the resolution each layer's masks need.
POOLS_BEFORE = {
    "image": 0,
    "block1_conv2": 0,
    "block2_conv2": 1,
    "block3_conv2": 2,
    "block4_conv2": 3,
    "block5_conv2": 4,
}


def describe_weights(weights: str | None) -> str:
    """A sentence saying which VGG-19 weights a run uses, for logs and CLIs."""
    if weights in (None, "none"):
        return (
            "VGG-19 weights: none (seeded random). The perceptual loss is NOT the paper's: fine for tests "
            "and smoke runs, much worse images. Use --vgg_weights=imagenet (or a local file) for real training."
        )
    if weights == "imagenet":
        return "VGG-19 weights: Keras ImageNet (downloaded once and cached in ~/.keras/models), average pooling"
    return f"VGG-19 weights: {weights}, average pooling unless --vgg_pooling=max"


class VGGFeatures(keras.Model):
    """Frozen VGG-19 returning [image, block1_conv2, ..., block5_conv2] for RGB input in [0, 255].

    Args:
        weights: `imagenet`, `none`/None, or the path of a Keras VGG-19 weights file.
        pooling: `avg` (the original) or `max` (Keras' VGG-19).
        seed: seed of the random initialisation when weights is none.
    """

    def __init__(self, weights: str | None = "imagenet", pooling: str = "avg", seed: int = 0, **kwargs):
        kwargs.setdefault("name", "vgg19_features")
        super().__init__(**kwargs)
        if pooling not in ("avg", "max"):
            raise ValueError(f"VGG pooling must be 'avg' or 'max', got {pooling!r}")
        self.weights_source = "none" if weights in (None, "none") else weights
        self.pooling = pooling
        # Recompute each block's activations in the backward pass instead of keeping them (the
        # trainer's --remat); not part of the layer's config: the function is the same.
        self.remat = False
        self.convs: list[keras.layers.Conv2D] = []
        self._plan: list[tuple[str, keras.layers.Layer]] = []
        for block, count, filters in _VGG19_BLOCKS:
            if block > 1:
                pool_cls = keras.layers.AveragePooling2D if pooling == "avg" else keras.layers.MaxPooling2D
                pool = pool_cls(2, strides=2, name=f"block{block - 1}_pool")
                self._plan.append((pool.name, pool))
            for i in range(1, count + 1):
                name = f"block{block}_conv{i}"
                conv = keras.layers.Conv2D(
                    filters,
                    3,
                    padding="same",
                    activation="relu",
                    name=name,
                    kernel_initializer=glorot_uniform(seed=seed + len(self.convs)),
                )
                self.convs.append(conv)
                self._plan.append((name, conv))
                if name == FEATURE_LAYERS[-1]:
                    break
        in_channels = 3
        for conv in self.convs:
            conv.build((None, None, None, in_channels))
            in_channels = conv.filters
        self.built = True
        self._load_weights(self.weights_source)
        self.trainable = False

    def _load_weights(self, weights: str) -> None:
        if weights == "none":
            return
        if weights != "imagenet" and not _exists(weights):
            raise ValueError(f"--vgg_weights: {weights} does not exist; expected 'imagenet', 'none' or a weights file")
        try:
            reference = keras.applications.VGG19(include_top=False, weights=weights, input_shape=(None, None, 3))
        except Exception as e:
            raise ValueError(f"--vgg_weights: could not load VGG-19 weights from {weights!r}: {e}") from e
        for conv in self.convs:
            conv.set_weights(reference.get_layer(conv.name).get_weights())

    def call(self, images):
        """images: RGB [N, H, W, 3] in [0, 255] -> list of 6 tensors in LOSS_LAYERS order."""
        dtype = keras.backend.standardize_dtype(images.dtype)
        x = ops.flip(images, axis=-1) - ops.convert_to_tensor(np.array(VGG_MEAN_RGB[::-1]), dtype)  # BGR - mean
        if self.remat or fast_convolutions(True):
            return [images] + self._block_features(x, self.remat)
        outputs = [images]
        for name, layer in self._plan:
            x = layer(x)
            if name in FEATURE_LAYERS:
                outputs.append(x)
        return outputs

    def _block_features(self, x, remat: bool) -> list:
        """The five feature tensors, computed block by block from the frozen weights read as tensors:
        with `remat` each block under crn_tf.ops.recompute (the backward pass keeps only the blocks'
        outputs and recomputes the rest); on CPUs with oneDNN its convolutions in TensorFlow's CPU
        form without kernel gradients (`_conv_relu`).

        The weights are read outside the recomputed functions and captured as tensors: on TensorFlow
        a variable read inside would be differentiated by tf.recompute_grad (Keras' frozen layers keep
        trainable tf.Variables), and VGG's filter gradients cost as much as its forward pass.
        """
        dtype = x.dtype
        weights = {c.name: (ops.cast(c.kernel, dtype), ops.cast(c.bias, dtype)) for c in self.convs}
        pool = ops.average_pool if self.pooling == "avg" else ops.max_pool
        fast = fast_convolutions(True)
        blocks: list[list[str]] = []
        for name, _ in self._plan:
            if name.endswith("_pool") or not blocks:
                blocks.append([])
            blocks[-1].append(name)

        def run(names):
            def block(y):
                outputs = []
                for name in names:
                    if name.endswith("_pool"):
                        y = pool(y, pool_size=2, strides=2, padding="valid")
                        continue
                    y = _conv_relu(y, *weights[name], fast=fast)
                    if name in FEATURE_LAYERS:
                        outputs.append(y)
                return y, outputs[0]  # the block's last activation (input of the next) and its loss layer

            return recompute(block) if remat else block

        outputs = []
        for names in blocks:
            x, feature = run(names)(x)
            outputs.append(feature)
        return outputs


def _conv_relu(x, kernel, bias, fast: bool):
    """A frozen VGG-19 convolution: relu(conv3x3(x) + bias). `fast`: TensorFlow's CPU convolution form
    (crn_tf.ops.fast_convolutions), with no kernel gradient: oneDNN's forward convolution on CPUs
    without AVX-512 is an im2col GEMM whose scratchpad is 9 x its input per call (4.8 GB for
    block1_conv2 at 1024x2048), or its reference kernel; the input-gradient form is not."""
    return ops.relu(conv3x3(x, kernel, fast=fast, frozen=True) + bias)


def _exists(path: str) -> bool:
    """A local path, or (through tf.io.gfile, imported only then) a remote one such as gs://."""
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf  # deferred: local paths need no TensorFlow

    return tf.io.gfile.exists(path)
