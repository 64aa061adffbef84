"""Training step speed of the paper-width CRN, against this machine's own convolution throughput.

    PYTHONPATH=. python benchmarks/train_step.py --sizes=128x256,256x512   # ~5 min on 2 CPU cores

For each size: seconds per training step (batch 1, crn_tf.train's step: generator forward, VGG-19
on synthesized and reference images, backward, Adam), images/s, the step's FLOPs counted from the
architecture (every convolution: 2 * H * W * 9 * Cin * Cout multiply-adds; training = generator
forward + 2x backward, VGG-19 forward on both images + input-gradient backward on the synthesized
one), the achieved GFLOP/s, and that as a fraction of TensorFlow's 3x3 convolution throughput
measured in the same run (forward + backward of 3x3 convolutions of the shapes that dominate the
cascade, the best of three) right before and after each timed step: each step is compared with the mean
of its two neighbours, and the medians are reported. VGG weights: none (same cost as ImageNet's).
"""

import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("preset", "cityscapes_256p", "Model preset (paper widths).")
flags.DEFINE_integer("num_outputs", 1, "k (the released 256p model has 9).")
flags.DEFINE_list("sizes", ["128x256", "256x512"], "Training sizes HxW.")
flags.DEFINE_integer("steps", 3, "Timed steps per size (after one warm-up step).")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the replica step.")
FLAGS = flags.FLAGS

VGG19_CONVS = [(3, 64), (64, 64), "pool", (64, 128), (128, 128), "pool", (128, 256), (256, 256), (256, 256)]
VGG19_CONVS += [(256, 256), "pool", (256, 512), (512, 512), (512, 512), (512, 512), "pool", (512, 512), (512, 512)]


def generator_flops(config, h: int, w: int) -> float:
    """Forward FLOPs of the cascade at h x w."""
    flops, prev = 0.0, 0
    for i, width in enumerate(config.widths):
        scale = 2 ** (config.num_modules - 1 - i)
        pixels = (h // scale) * (w // scale)
        flops += 2 * pixels * 9 * ((prev + config.input_channels) * width + width * width)
        prev = width
    return flops + 2 * h * w * prev * 3 * config.num_outputs


def vgg_flops(h: int, w: int) -> float:
    """Forward FLOPs of VGG-19 up to conv5_2 at h x w."""
    flops = 0.0
    for layer in VGG19_CONVS:
        if layer == "pool":
            h, w = h // 2, w // 2
        else:
            flops += 2 * h * w * 9 * layer[0] * layer[1]
    return flops


CONV_SHAPES = ((32, 64, 1024, 1024), (64, 128, 512, 512), (128, 256, 256, 256))  # (H, W, Cin, Cout)


def conv_throughput(repeats: int = 4) -> float:
    """TensorFlow's best GFLOP/s on 3x3 convolutions of the cascade's shapes, forward + backward.

    Forward plus the gradients w.r.t. input and filter: 3x the forward FLOPs, as in a training step.
    The best of three shapes that dominate the paper-width cascade.
    """
    import tensorflow as tf

    best = 0.0
    for h, w, cin, cout in CONV_SHAPES:
        x = tf.Variable(tf.random.normal([1, h, w, cin]))
        k = tf.Variable(tf.random.normal([3, 3, cin, cout]) * 0.01)

        @tf.function
        def fwd_bwd(x=x, k=k):
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(tf.nn.conv2d(x, k, 1, "SAME"))
            return tape.gradient(y, [x, k])

        fwd_bwd()[0].numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            grads = fwd_bwd()
        grads[1].numpy()
        flops = 3 * 2 * h * w * 9 * cin * cout * repeats
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from crn_tf.config import get_preset, parse_size
    from crn_tf.train import TrainConfig, Trainer

    config = get_preset(FLAGS.preset, num_outputs=FLAGS.num_outputs)
    rows, peaks = [], []
    for size in FLAGS.sizes:
        h, w = parse_size(size, "--sizes")
        with tempfile.TemporaryDirectory() as model_dir:
            train_config = TrainConfig(batch_size=1, vgg_weights="none", jit_compile=FLAGS.jit_compile)
            trainer = Trainer(config, train_config, model_dir, log=lambda *a, **k: None)
            ids = np.random.default_rng(0).integers(0, 20, [1, h, w])
            batch = {"layout": tf.one_hot(ids, 20), "image": tf.random.uniform([1, h, w, 3], 0, 255)}
            it = iter(trainer.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
            step = trainer.train_step
            float(step(it)[0]["total"])  # trace + warm-up
            k = config.num_outputs
            flops = 3 * generator_flops(config, h, w) + vgg_flops(h, w) * (1 + 2 * k)
            # The machine is shared: the conv reference is measured right before and after each step,
            # and each step is compared with the mean of its two neighbours.
            seconds, fractions = [], []
            before = conv_throughput(repeats=2)
            for _ in range(FLAGS.steps):
                start = time.perf_counter()
                float(step(it)[0]["total"])
                seconds.append(time.perf_counter() - start)
                after = conv_throughput(repeats=2)
                fractions.append(flops / seconds[-1] / 1e9 / ((before + after) / 2))
                peaks += [before, after]
                before = after
        s = float(np.median(seconds))
        rows.append((f"{h}x{w}", s, 1 / s, flops / 1e9, flops / s / 1e9, float(np.median(fractions))))
        del trainer
    print(f"\n{FLAGS.preset} (k={config.num_outputs}, {config.num_parameters() / 1e6:.1f}M parameters), ", end="")
    print(f"CPU cores: {os.cpu_count()}, TensorFlow {tf.__version__}, XLA: {FLAGS.jit_compile}")
    print(
        f"TensorFlow 3x3 conv throughput (best of {len(CONV_SHAPES)} cascade shapes, fwd+bwd): "
        f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s during the run\n"
    )
    print("| size | s/step | images/s | GFLOP/step | GFLOP/s | fraction of conv throughput (around each step) |")
    print("|---|---|---|---|---|---|")
    for size, sec, ips, gflop, rate, fraction in rows:
        print(f"| {size} | {sec:.2f} | {ips:.3f} | {gflop:.0f} | {rate:.1f} | {fraction:.0%} |")


if __name__ == "__main__":
    app.run(main)
