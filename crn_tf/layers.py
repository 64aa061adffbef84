"""The CRN's building blocks as Keras layers: the refinement module (paper Sec. 3.2, Fig. 3) and
the output head, plus the two resampling operations the cascade uses between scales."""

from __future__ import annotations

import keras
import tensorflow as tf

from crn_tf.config import LAYER_NORM_EPSILON, LEAKY_RELU_SLOPE, NORMALIZATIONS, UPSAMPLING_MODES


def area_downsample(x):
    """Halves height and width by area resampling. [N, H, W, C] -> [N, H/2, W/2, C].

    The original code calls `resize_area` recursively, halving each time; for an exact factor of two
    that is 2x2 average pooling (max difference ~2e-7), which, unlike ResizeArea, XLA can compile.
    """
    return tf.nn.avg_pool2d(x, ksize=2, strides=2, padding="VALID")


def bilinear_upsample(x, size, mode: str = "align_corners"):
    """Bilinear resize of [N, h, w, C] to `size` (H, W), keeping x's dtype.

    `align_corners` is TF1's `resize_bilinear(align_corners=True)`, what the released models were
    trained with; `half_pixel` is TF2's `tf.image.resize` convention.
    """
    if mode == "align_corners":
        y = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True, half_pixel_centers=False)
    elif mode == "half_pixel":
        y = tf.image.resize(x, size, method="bilinear")
    else:
        raise ValueError(f"upsampling mode must be one of {UPSAMPLING_MODES}, got {mode!r}")
    return tf.cast(y, x.dtype)  # the resize kernels return float32


@keras.saving.register_keras_serializable(package="crn_tf")
class RefinementModule(keras.layers.Layer):
    """One refinement module M^i of a Cascaded Refinement Network (Chen & Koltun 2017, Sec. 3.2).

    Input: the layout downsampled to this module's resolution, concatenated after the previous
    module's features bilinearly upsampled to it (the first module sees only the layout). Then
    twice: 3x3 convolution without bias -> layer normalisation (statistics over H, W, C of each
    sample, learned per-channel scale and offset) -> LeakyReLU(0.2).

    Args:
        width: number of feature maps d_i.
        upsampling: `align_corners` (original) or `half_pixel`.
        normalization: `layer` (paper) or `none`.
    """

    def __init__(self, width: int, upsampling: str = "align_corners", normalization: str = "layer", **kwargs):
        super().__init__(**kwargs)
        if upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.width = int(width)
        self.upsampling = upsampling
        self.normalization = normalization
        conv = dict(kernel_size=3, padding="same", use_bias=False)
        self.conv1 = keras.layers.Conv2D(self.width, name="conv1", **conv)
        self.conv2 = keras.layers.Conv2D(self.width, name="conv2", **conv)
        if normalization == "layer":
            # groups=1: one group spanning all channels = slim.layer_norm over H, W, C with
            # per-channel gamma/beta. (LayerNormalization(axis=[1,2,3]) would tie params to H x W.)
            self.norm1 = keras.layers.GroupNormalization(groups=1, epsilon=LAYER_NORM_EPSILON, name="norm1")
            self.norm2 = keras.layers.GroupNormalization(groups=1, epsilon=LAYER_NORM_EPSILON, name="norm2")
        else:
            self.norm1 = self.norm2 = None

    def build(self, layout_shape, features_shape=None):
        in_channels = layout_shape[-1] + (features_shape[-1] if features_shape is not None else 0)
        self.conv1.build((None, None, None, in_channels))
        self.conv2.build((None, None, None, self.width))
        if self.norm1 is not None:
            self.norm1.build((None, None, None, self.width))
            self.norm2.build((None, None, None, self.width))
        self.built = True

    def _conv_norm_act(self, x, conv, norm):
        x = conv(x)
        if norm is not None:
            x = norm(x)
        return tf.nn.leaky_relu(x, alpha=LEAKY_RELU_SLOPE)

    def call(self, layout, features=None):
        """layout: [N, H, W, C]; features: [N, H/2, W/2, d_{i-1}] or None -> [N, H, W, width]."""
        if features is None:
            x = self.conv1(layout)
        else:
            upsampled = bilinear_upsample(features, tf.shape(layout)[1:3], self.upsampling)
            x = self._split_conv1(upsampled, layout)
        if self.norm1 is not None:
            x = self.norm1(x)
        x = tf.nn.leaky_relu(x, alpha=LEAKY_RELU_SLOPE)
        return self._conv_norm_act(x, self.conv2, self.norm2)

    def _split_conv1(self, upsampled, layout):
        """conv1 over concat([upsampled, layout]) computed as two convolutions summed.

        The same function with the same kernel (conv1's [3, 3, d_prev + C, d], features' rows
        first, as the original concatenation order): checkpoints, import and export are unchanged.
        Why: 1044 or 532 input channels are not a multiple of the CPU/GPU convolution blocking, so
        oneDNN and cuDNN pad and reorder the concatenated tensor; the split also saves writing the
        concatenation. Measured in benchmarks/vs_original.py.
        """
        kernel = tf.cast(self.conv1.kernel, upsampled.dtype)
        d = upsampled.shape[-1]
        if d is None:
            d = tf.shape(upsampled)[-1]
        # tf.split, not slicing: the gradient of a split is one concatenation; a slice's gradient
        # (StridedSliceGrad) writes a zero-padded full kernel per part.
        k_features, k_layout = tf.split(kernel, [d, -1], axis=2)
        y = tf.nn.conv2d(upsampled, k_features, strides=1, padding="SAME")
        return y + tf.nn.conv2d(tf.cast(layout, upsampled.dtype), k_layout, strides=1, padding="SAME")

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "upsampling": self.upsampling,
            "normalization": self.normalization,
        }


@keras.saving.register_keras_serializable(package="crn_tf")
class OutputHead(keras.layers.Layer):
    """Linear 1x1 projection of the last features to k RGB images, then (x + 1) / 2 * 255.

    Paper Sec. 3.2: "not followed by normalization or nonlinearity". Output [N, H, W, 3k] in about
    [0, 255] (not clipped); image u is channels 3u..3u+2.
    """

    def __init__(self, num_outputs: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_outputs = int(num_outputs)
        self.conv = keras.layers.Conv2D(3 * self.num_outputs, kernel_size=1, use_bias=True, name="conv")

    def build(self, features_shape):
        self.conv.build(features_shape)
        self.built = True

    def call(self, features):
        return (self.conv(features) + 1.0) / 2.0 * 255.0

    def get_config(self):
        return {**super().get_config(), "num_outputs": self.num_outputs}
