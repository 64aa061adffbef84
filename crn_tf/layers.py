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


def conv3x3(x, kernel, as_backprop_input: bool = False):
    """3x3 convolution, stride 1, SAME padding, no bias: tf.nn.conv2d(x, kernel, 1, "SAME").

    `as_backprop_input` computes the same convolution as the input gradient of one whose kernel is
    flipped in H and W with its channel axes swapped (tf.nn.conv2d_transpose), and its gradients with
    the usual two ops (input and filter gradient), through tf.custom_gradient. Why: TensorFlow's
    oneDNN forward convolution runs at about half the speed of its input-gradient convolution on the
    same shapes (measured on x86 CPUs with AVX-512: 182 vs 350 GFLOP/s for 1024 -> 512 channels at
    128x256, bit-identical results; benchmarks/README.md); the training step's forward convolutions
    are a third of its convolution FLOPs. Used in training where TensorFlow runs on CPUs only, with
    oneDNN (`onednn_cpu_only`).
    """
    if not as_backprop_input:
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return _conv3x3_as_backprop_input(x, kernel)


@tf.custom_gradient
def _conv3x3_as_backprop_input(x, kernel):
    flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])  # [3, 3, out, in]
    out_shape = tf.concat([tf.shape(x)[:3], tf.shape(kernel)[3:]], axis=0)
    y = tf.nn.conv2d_transpose(x, flipped, out_shape, strides=1, padding="SAME")

    def grad(dy):
        # tf.nn.conv2d's own gradient: the input gradient and the filter gradient of (x, kernel).
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
        )
        dk = tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
        )
        return dx, dk

    return y, grad


def onednn_cpu_only() -> bool:
    """True where TensorFlow sees no GPU and runs its CPU kernels with oneDNN (the x86 default): there
    `conv3x3(..., as_backprop_input=True)` is faster. Not with TensorFlow's own (Eigen) kernels
    (TF_ENABLE_ONEDNN_OPTS=0, most non-x86 builds), whose input-gradient convolution is the slower one
    (0.18 vs 0.12 s for 512 -> 512 channels at 64x128, measured)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without the query: keep tf.nn.conv2d
        onednn = False
    return onednn and not tf.config.list_logical_devices("GPU")


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

    def call(self, layout, features=None, training=None):
        """layout: [N, H, W, C]; features: [N, H/2, W/2, d_{i-1}] or None -> [N, H, W, width].

        training: in training on CPUs only (with oneDNN), the 3x3 convolutions over the features run as
        `conv3x3(..., as_backprop_input=True)` (the same function, faster there); otherwise, and in
        every export, as Keras' Conv2D.
        """
        fast = bool(training) and onednn_cpu_only()
        if features is None:
            x = self.conv1(layout)
        else:
            upsampled = bilinear_upsample(features, tf.shape(layout)[1:3], self.upsampling)
            x = self._split_conv1(upsampled, layout, fast)
        x = self._norm_act(x, self.norm1)
        x = conv3x3(x, tf.cast(self.conv2.kernel, x.dtype), as_backprop_input=True) if fast else self.conv2(x)
        return self._norm_act(x, self.norm2)

    @staticmethod
    def _norm_act(x, norm):
        if norm is not None:
            x = norm(x)
        return tf.nn.leaky_relu(x, alpha=LEAKY_RELU_SLOPE)

    def _split_conv1(self, upsampled, layout, fast: bool = False):
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
        y = conv3x3(upsampled, k_features, as_backprop_input=fast)
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
