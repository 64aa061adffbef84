"""The few operations of the CRN whose best form depends on the Keras backend.

Everything here takes and returns backend tensors through `keras.ops`; what TensorFlow does faster
(its native align-corners resize, the CPU convolution form, `tf.recompute_grad` and a run-time size
check for graphs of unknown shape) lives in `crn_tf/tf_ops.py` and is imported only when Keras runs
on TensorFlow. So on JAX (`KERAS_BACKEND=jax`) the model, VGG-19 and the losses import no TensorFlow.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from crn_tf.config import LEAKY_RELU_SLOPE, UPSAMPLING_MODES


def on_tensorflow() -> bool:
    """True when Keras runs on TensorFlow (fixed when Keras is imported)."""
    return keras.backend.backend() == "tensorflow"


def _tf_ops():
    from crn_tf import tf_ops  # deferred: imports TensorFlow

    return tf_ops


def area_downsample(x):
    """Halves height and width by area resampling. [N, H, W, C] -> [N, H/2, W/2, C].

    The original code calls `resize_area` recursively, halving each time; for an exact factor of two
    that is 2x2 average pooling (max difference ~2e-7), which, unlike ResizeArea, XLA can compile.
    """
    return ops.average_pool(x, pool_size=2, strides=2, padding="valid")


@functools.lru_cache(maxsize=64)
def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of 1-D linear interpolation with aligned corners.

    Output i samples input position i * (in - 1) / (out - 1) (0 when out == 1), as TF1's
    `resize_bilinear(align_corners=True)`: the two neighbours weighted by distance. Each row sums to 1.
    """
    m = np.zeros((out_size, in_size), np.float64)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def bilinear_upsample(x, size, mode: str = "align_corners"):
    """Bilinear resize of [N, h, w, C] to `size` (H, W), keeping x's dtype.

    `align_corners` is TF1's `resize_bilinear(align_corners=True)`, what the released models were
    trained with; `half_pixel` is TF2's `tf.image.resize` convention. On TensorFlow this is its native
    kernel (any size, known or not when traced). Elsewhere `align_corners` is two interpolation
    matrices applied with einsum (the same function: each output is the same two-tap weighted sum;
    exact up to float rounding, and a matrix product is what GPUs and TPUs run fastest); it needs the
    sizes when traced, which JAX always has.
    """
    if mode not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling mode must be one of {UPSAMPLING_MODES}, got {mode!r}")
    if on_tensorflow():
        return _tf_ops().bilinear_upsample(x, size, mode)
    out_h, out_w = (int(s) for s in size)
    if mode == "half_pixel":
        return ops.cast(ops.image.resize(x, (out_h, out_w), interpolation="bilinear"), x.dtype)
    in_h, in_w = x.shape[1], x.shape[2]
    if in_h is None or in_w is None:
        raise ValueError(f"bilinear_upsample needs the input's height and width when traced, got shape {x.shape}")
    dtype = keras.backend.standardize_dtype(x.dtype)
    rows = ops.convert_to_tensor(align_corners_matrix(out_h, in_h), dtype=dtype)
    cols = ops.convert_to_tensor(align_corners_matrix(out_w, in_w), dtype=dtype)
    # Width first: with W >= H it is the cheaper order (fewer multiply-adds on the wider axis).
    x = ops.einsum("Ww,nhwc->nhWc", cols, x)
    return ops.einsum("Hh,nhWc->nHWc", rows, x)


def fast_convolutions(training) -> bool:
    """Whether the modules' 3x3 convolutions run in the CPU convolution form (`conv3x3(fast=True)`):
    in training, on TensorFlow without a GPU and with oneDNN (see `tf_ops.onednn_cpu_only`)."""
    return bool(training) and on_tensorflow() and _tf_ops().onednn_cpu_only()


def conv3x3(x, kernel, fast: bool = False, frozen: bool = False):
    """3x3 convolution, stride 1, SAME padding, no bias. `fast`: TensorFlow's CPU convolution form
    (`tf_ops.conv3x3_as_backprop_input`: the same function and gradients); only where
    `fast_convolutions` says so. `frozen` (with `fast`): the kernel gets no gradient (VGG-19's)."""
    if fast:
        tf_ops = _tf_ops()
        form = tf_ops.frozen_conv3x3_as_backprop_input if frozen else tf_ops.conv3x3_as_backprop_input
        return form(x, kernel)
    return ops.conv(x, kernel, strides=1, padding="same")


def leaky_relu(x):
    """LeakyReLU with the paper's slope (0.2)."""
    return ops.leaky_relu(x, negative_slope=LEAKY_RELU_SLOPE)


def recompute(fn):
    """`fn` whose activations the backward pass recomputes instead of keeping (gradient checkpointing):
    `tf.recompute_grad` on TensorFlow (it differentiates the variables `fn` reads), `keras.remat`
    (`jax.checkpoint`) on JAX."""
    if on_tensorflow():
        return _tf_ops().recompute_grad(fn)
    return keras.remat(fn)


def glorot_uniform(seed: int | None = None):
    """The convolutions' kernel initializer: Keras' GlorotUniform on TensorFlow; on other backends the
    same distribution drawn with NumPy (JAX compiles a random-number kernel for every distinct shape,
    ~1 s each on a 2-core CPU: half a minute before the first step otherwise). `seed` None draws from
    NumPy's global generator, which keras.utils.set_random_seed seeds."""
    if on_tensorflow():
        return keras.initializers.GlorotUniform(seed=seed)
    return NumpyGlorotUniform(seed=seed)


@keras.saving.register_keras_serializable(package="crn_tf")
class NumpyGlorotUniform(keras.initializers.Initializer):
    """Glorot (Xavier) uniform: U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), drawn with NumPy."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        shape = tuple(int(d) for d in shape)
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = (shape[-2] * receptive, shape[-1] * receptive) if len(shape) >= 2 else (shape[0],) * 2
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        rng = np.random.default_rng(self.seed) if self.seed is not None else np.random
        values = rng.uniform(-limit, limit, shape).astype(keras.backend.standardize_dtype(dtype or "float32"))
        return ops.convert_to_tensor(values)

    def get_config(self):
        return {"seed": self.seed}


def check_size_multiple(layout, multiple: int, message: str):
    """`layout` itself; where its height or width is unknown when traced (a TensorFlow graph of any
    size), with a run-time check that both are positive multiples of `multiple`."""
    h, w = layout.shape[1], layout.shape[2]
    if (h is None or w is None) and on_tensorflow():
        return _tf_ops().assert_size_multiple(layout, multiple, message)
    return layout
