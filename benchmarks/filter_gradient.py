"""The 3x3 kernel gradient: oneDNN's filter-gradient convolution against nine matrix products.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/filter_gradient.py                 # ~2 min
    ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/filter_gradient.py

For each shape (the training step's: modules at 128x256 .. 1024x2048, the layout's 20 channels),
`tf.raw_ops.Conv2DBackpropFilter` (tf.nn.conv2d's own kernel gradient) against
`crn_tf.tf_ops.filter_gradient_as_matmuls`, each in a `tf.function` with one inter-op thread (one op
at a time, so each op has both cores), batch 1, float32; after a warm-up call, the median of
`--repeats` calls, alternated; the ratio, and the largest difference relative to the gradient's
largest magnitude. Prints the host's CPU flags and any ONEDNN_MAX_CPU_ISA cap.
`crn_tf.tf_ops.MATMUL_FILTER_GRADIENT_MIN_CHANNELS` is the threshold this table chose.
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import host_description  # noqa: E402 - this folder's helper

flags.DEFINE_list(
    "shapes",
    [
        "128x256:512:512",
        "128x256:1024:512",
        "64x128:1024:1024",
        "32x64:1024:1024",
        "8x16:1024:1024",
        "256x512:1024:512",
        "512x1024:512:128",
        "512x1024:128:128",
        "1024x2048:128:32",
        "1024x2048:32:32",
        "128x256:20:512",
        "1024x2048:20:32",
    ],
    "HxW:C_in:C_out of each kernel gradient.",
)
flags.DEFINE_integer("repeats", 3, "Timed calls per form and shape (after one warm-up call each).", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from crn_tf.tf_ops import filter_gradient_as_matmuls

    tf.config.threading.set_inter_op_parallelism_threads(1)
    print("host:", host_description())

    def convolution(x, dy):
        k = tf.constant([3, 3, x.shape[-1], dy.shape[-1]])
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=k, out_backprop=dy, strides=[1] * 4, padding="SAME"
        )

    forms = {"convolution": tf.function(convolution), "matmuls": tf.function(filter_gradient_as_matmuls)}
    print("| size | C_in -> C_out | convolution ms | matrix products ms | ratio | max difference (relative) |")
    print("|---|---|---|---|---|---|")
    for spec in FLAGS.shapes:
        try:
            size, c_in, c_out = spec.split(":")
            h, w = (int(v) for v in size.split("x"))
            c_in, c_out = int(c_in), int(c_out)
        except ValueError:
            raise app.UsageError(f"--shapes: {spec!r} is not HxW:C_in:C_out") from None
        if min(h, w, c_in, c_out) < 1:
            raise app.UsageError(f"--shapes: {spec!r} needs a positive height, width and channel counts")
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal([1, h, w, c_in], np.float32))
        dy = tf.constant(rng.standard_normal([1, h, w, c_out], np.float32))
        results = {name: f(x, dy).numpy() for name, f in forms.items()}  # traces; warm-up
        times = {name: [] for name in forms}
        for _ in range(FLAGS.repeats):
            for name, f in forms.items():
                start = time.perf_counter()
                f(x, dy).numpy()
                times[name].append(time.perf_counter() - start)
        conv, mm = (statistics.median(times[name]) * 1000 for name in forms)
        reference = results["convolution"]
        diff = np.abs(results["matmuls"] - reference).max() / np.abs(reference).max()
        print(f"| {h}x{w} | {c_in} -> {c_out} | {conv:.0f} | {mm:.0f} | {mm / conv:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    app.run(main)
