"""The CRN's building blocks as Keras layers: the refinement module (paper Sec. 3.2, Fig. 3) and
the output head. Backend-agnostic (`keras.ops` and `crn_tf.ops`, no TensorFlow import): the same
layers run on TensorFlow and JAX."""

from __future__ import annotations

import keras
from keras import ops

from crn_tf.config import LAYER_NORM_EPSILON, NORMALIZATIONS, UPSAMPLING_MODES
from crn_tf.ops import bilinear_upsample, conv3x3, fast_convolutions, glorot_uniform, leaky_relu


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
        self.conv1 = keras.layers.Conv2D(self.width, name="conv1", kernel_initializer=glorot_uniform(), **conv)
        self.conv2 = keras.layers.Conv2D(self.width, name="conv2", kernel_initializer=glorot_uniform(), **conv)
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

    def call(self, layout, features=None, training=None):
        """layout: [N, H, W, C]; features: [N, H/2, W/2, d_{i-1}] or None -> [N, H, W, width].

        training: in training on TensorFlow on CPUs only (with oneDNN), the 3x3 convolutions over the
        features run in the CPU convolution form (`crn_tf.ops.fast_convolutions`: the same function,
        faster there); otherwise, on every other backend and in every export, as Keras' Conv2D.
        """
        fast = fast_convolutions(training)
        if features is None:
            x = conv3x3(layout, ops.cast(self.conv1.kernel, layout.dtype), fast=True) if fast else self.conv1(layout)
        else:
            upsampled = bilinear_upsample(features, ops.shape(layout)[1:3], self.upsampling)
            x = self._split_conv1(upsampled, layout, fast)
        x = self._norm_act(x, self.norm1)
        x = conv3x3(x, ops.cast(self.conv2.kernel, x.dtype), fast=True) if fast else self.conv2(x)
        return self._norm_act(x, self.norm2)

    @staticmethod
    def _norm_act(x, norm):
        if norm is not None:
            x = norm(x)
        return leaky_relu(x)

    def _split_conv1(self, upsampled, layout, fast: bool = False):
        """conv1 over concat([upsampled, layout]) computed as two convolutions summed.

        The same function with the same kernel (conv1's [3, 3, d_prev + C, d], features' rows
        first, as the original concatenation order): checkpoints, import and export are unchanged.
        Why: 1044 or 532 input channels are not a multiple of the CPU/GPU convolution blocking, so
        oneDNN and cuDNN pad and reorder the concatenated tensor; the split also saves writing the
        concatenation. Measured in benchmarks/vs_original.py.
        """
        kernel = ops.cast(self.conv1.kernel, upsampled.dtype)
        d = self.conv1.kernel.shape[2] - layout.shape[-1]  # the previous module's width
        # A split, not slicing: on TensorFlow the gradient of tf.split is one concatenation; a slice's
        # gradient (StridedSliceGrad) writes a zero-padded full kernel per part.
        k_features, k_layout = ops.split(kernel, [d], axis=2)
        y = conv3x3(upsampled, k_features, fast=fast)
        return y + conv3x3(ops.cast(layout, upsampled.dtype), k_layout, fast=fast)

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
        self.conv = keras.layers.Conv2D(
            3 * self.num_outputs, kernel_size=1, use_bias=True, name="conv", kernel_initializer=glorot_uniform()
        )

    def build(self, features_shape):
        self.conv.build(features_shape)
        self.built = True

    def call(self, features):
        return (self.conv(features) + 1.0) / 2.0 * 255.0

    def get_config(self):
        return {**super().get_config(), "num_outputs": self.num_outputs}
