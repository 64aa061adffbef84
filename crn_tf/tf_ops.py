"""TensorFlow's faster forms of crn_tf.ops: imported by it only when Keras runs on TensorFlow."""

from __future__ import annotations

import tensorflow as tf


def bilinear_upsample(x, size, mode: str):
    """TensorFlow's own bilinear resize (any size, known or not when traced), keeping x's dtype.
    size: (H, W) as ints, scalar tensors (keras.ops.shape of a graph tensor) or one int32 tensor."""
    if isinstance(size, (tuple, list)):
        size = tf.stack([tf.cast(s, tf.int32) for s in size])
    if mode == "align_corners":
        y = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True, half_pixel_centers=False)
    else:
        y = tf.image.resize(x, size, method="bilinear")
    return tf.cast(y, x.dtype)  # the resize kernels return float32


@tf.custom_gradient
def conv3x3_as_backprop_input(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, "SAME") computed as the input gradient of a convolution whose kernel
    is flipped in H and W with its channel axes swapped (tf.nn.conv2d_transpose), with tf.nn.conv2d's
    own two gradient ops. Why: TensorFlow's oneDNN forward convolution runs at about half the speed
    of its input-gradient convolution on the same shapes (measured on x86 CPUs with AVX-512: 182 vs
    350 GFLOP/s for 1024 -> 512 channels at 128x256, bit-identical results; benchmarks/README.md);
    the training step's forward convolutions are a third of its convolution FLOPs. On CPUs without
    AVX-512 oneDNN's forward convolution is worse: an im2col GEMM whose scratchpad holds 9x its input
    (4.8 GB for VGG-19's block1_conv2 at 1024x2048), or, where that is refused, its reference kernel;
    its input-gradient convolution runs brgemm kernels there too (ONEDNN_VERBOSE=1 with
    ONEDNN_MAX_CPU_ISA=AVX2; tests/test_remat.py checks that no 3x3 convolution of a step runs forward).
    """
    y = _conv3x3_as_transpose(x, kernel)

    def grad(dy):
        # tf.nn.conv2d's gradient: its own input-gradient op; the filter gradient as nine matrix
        # products where both channel counts are large (`_conv3x3_filter_gradient`).
        return _conv3x3_input_gradient(x, kernel, dy), _conv3x3_filter_gradient(x, kernel, dy)

    return y, grad


@tf.custom_gradient
def frozen_conv3x3_as_backprop_input(x, kernel):
    """`conv3x3_as_backprop_input` of a kernel that is not trained (VGG-19's): the input gradient
    only. The kernel's gradient is None, so no filter-gradient convolution is built for it."""

    def grad(dy):
        return _conv3x3_input_gradient(x, kernel, dy), None

    return _conv3x3_as_transpose(x, kernel), grad


def _conv3x3_as_transpose(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, "SAME") as tf.nn.conv2d_transpose with the kernel flipped in H and W
    and its channel axes swapped."""
    flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])  # [3, 3, out, in]
    out_shape = tf.concat([tf.shape(x)[:3], tf.shape(kernel)[3:]], axis=0)
    return tf.nn.conv2d_transpose(x, flipped, out_shape, strides=1, padding="SAME")


def _conv3x3_input_gradient(x, kernel, dy):
    """The gradient of tf.nn.conv2d(x, kernel, 1, "SAME") with respect to x, given dy: its own op."""
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
    )


# Both channel counts at least this: the kernel gradient runs as matrix products (measured faster on
# AVX-512 and AVX2 for 128 and more channels on both sides, slower on AVX-512 below:
# benchmarks/filter_gradient.py).
MATMUL_FILTER_GRADIENT_MIN_CHANNELS = 128


def _conv3x3_filter_gradient(x, kernel, dy):
    """The gradient of tf.nn.conv2d(x, kernel, 1, "SAME") with respect to the kernel, given dy: as
    `filter_gradient_as_matmuls` where both channel counts are >= MATMUL_FILTER_GRADIENT_MIN_CHANNELS
    and multiples of 16 (so its slices are views, not copies), else TensorFlow's own op. Why: oneDNN's
    filter-gradient convolution runs at less than half the rate of its other two 3x3 convolutions,
    and a third of the step's convolution FLOPs are filter gradients; the matrix products take
    0.46-0.59 of its time for 1024/512 channels from 64x128 up on AVX-512 and 0.15-0.33 on AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2). With fewer channels (the layout's 20, the top modules' 32 at 1024p) the
    convolution is faster on AVX-512 and stays (benchmarks/filter_gradient.py)."""
    c_in, c_out = kernel.shape[2], kernel.shape[3]
    if (
        c_in is not None
        and c_out is not None
        and min(c_in, c_out) >= MATMUL_FILTER_GRADIENT_MIN_CHANNELS
        and c_in % 16 == 0
        and c_out % 16 == 0
    ):
        return filter_gradient_as_matmuls(x, dy)
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
    )


def filter_gradient_as_matmuls(x, dy):
    """The 3x3 kernel gradient of a stride-1 "SAME" convolution, [3, 3, C_in, C_out], from its input
    x [N, H, W, C_in] and output gradient dy [N, H, W, C_out], as nine matrix products (one per
    kernel tap) over one flat zero-padded grid, with no im2col buffer.

    x is padded to [N, H + 2, W + 2, C_in] (a row and a column of zeros on each side) and dy to
    [N, H + 2, W + 2, C_out] (two after); both are flattened to rows. Row p of dy's grid and row
    p + kh * (W + 2) + kw of x's grid are then output pixel p and its input at tap (kh, kw); dy is
    zero on the padding, so no product crosses an image's border or a sample's, and the tap's
    gradient is x's rows [s, s + M) transposed times dy's rows [0, M). Memory: the padded copies,
    x's and dy's size. The same sums as the convolution's in another order: round-off (relative
    1e-6 in float32).
    """
    c_in, c_out = x.shape[-1], dy.shape[-1]
    row = tf.shape(x)[2] + 2  # the padded grid's width
    rows = tf.reshape(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), [-1, c_in])
    dy_rows = tf.reshape(tf.pad(dy, [[0, 0], [0, 2], [0, 2], [0, 0]]), [-1, c_out])
    m = tf.shape(rows)[0] - (2 * row + 2)  # the last tap's rows end at the grid's end (dy is 0 past m)
    dy_rows = tf.slice(dy_rows, [0, 0], [m, c_out])
    taps = [
        tf.matmul(tf.slice(rows, [kh * row + kw, 0], [m, c_in]), dy_rows, transpose_a=True)
        for kh in range(3)
        for kw in range(3)
    ]
    return tf.reshape(tf.stack(taps), [3, 3, c_in, c_out])


def onednn_cpu_only() -> bool:
    """True where TensorFlow sees no GPU and runs its CPU kernels with oneDNN (the x86 default): there
    `conv3x3_as_backprop_input` is faster. Not with TensorFlow's own (Eigen) kernels
    (TF_ENABLE_ONEDNN_OPTS=0, most non-x86 builds), whose input-gradient convolution is the slower one
    (0.18 vs 0.12 s for 512 -> 512 channels at 64x128, measured)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without the query: keep tf.nn.conv2d
        onednn = False
    return onednn and not tf.config.list_logical_devices("GPU")


def describe_convolutions() -> str:
    """Which form the training step's 3x3 convolutions take here, for the log."""
    if onednn_cpu_only():
        return (
            "convolutions: every 3x3 convolution of the training step (modules, layout, VGG-19) runs as oneDNN's "
            "input-gradient convolution (crn_tf.tf_ops.conv3x3_as_backprop_input): no im2col scratchpads; kernel "
            f"gradients with >= {MATMUL_FILTER_GRADIENT_MIN_CHANNELS} channels in and out as nine matrix products"
        )
    return "convolutions: TensorFlow's Conv2D (a GPU, or TensorFlow's own CPU kernels)"


def recompute_grad(fn):
    """tf.recompute_grad: keeps fn's inputs and outputs, recomputes the rest in the backward pass, and
    differentiates the variables fn reads."""
    return tf.recompute_grad(fn)


def assert_size_multiple(layout, multiple: int, message: str):
    """layout, after a run-time check that its height and width are positive multiples of `multiple`."""
    hw = tf.shape(layout)[1:3]
    ok = tf.reduce_all(tf.logical_and(hw % multiple == 0, hw >= multiple))
    with tf.control_dependencies([tf.debugging.Assert(ok, [message + "; got (height, width) =", hw])]):
        return tf.identity(layout)
