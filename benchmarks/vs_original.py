"""crn_tf's training step against the authors' training step, rebuilt as a TF1 graph, in one process.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/vs_original.py --sizes=128x256 --steps=3
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/vs_original.py --sizes=128x256 \\
        --variants=current,concat_conv1,reference_in_tape --steps=3        # the ablation of this change
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/vs_original.py --sizes=128x256 --profile --steps=1

The original side is the authors' computation (see ../shared/reference/original_crn.md) as a
tf.compat.v1 graph run by a Session: `resize_area` downsampling of the layout, recursive from the
top; `resize_bilinear(align_corners=True)` of the previous features; concat [features, layout];
per module two (3x3 conv without bias -> slim.layer_norm (moments over H, W, C, per-channel scale and
offset, epsilon 1e-12, via tf.nn.batch_normalization as slim does) -> lrelu = max(0.2x, x)); a 1x1
conv with bias; (x + 1) / 2 * 255; their VGG-19 (conv + bias + relu, average pools, weights as
constants) on the reference and on the synthesized image; the mean absolute differences of the input
and conv1_2..conv5_2 with the released 512p weights (1, 1/2.6, 1/4.8, 1/3.7, 1/5.6, 10/1.5); Adam 1e-4
over the generator's variables. The network is the same on both sides: modules 4x8 up to the image
size, paper widths (1024, and 512 from 128x256 up), 20 input channels, k = 1, batch 1, random VGG-19
weights (seeded; the same cost as ImageNet's).

The crn_tf side is `Trainer.train_step` of this tree (`current`), and, for the ablation, the step
with one of this change's speed-ups undone: `concat_conv1` (conv1 over the concatenated [features,
layout], as before), `reference_in_tape` (the reference's VGG-19 features computed inside the
gradient tape, as before) or `conv2d_forward` (the modules' forward convolutions as tf.nn.conv2d,
not as input gradients: crn_tf.tf_ops.conv3x3_as_backprop_input); `remat` is this tree's step with
--remat (its time overhead), `jit_compile` with --jit_compile (XLA). Each side is traced by a
warm-up step, then the sides alternate step by step (so load from other jobs hits all alike);
medians of the timed steps and each crn_tf variant's median / the original's median. The crn_tf
sides run with crn-train's `--inter_op_threads` (default: TensorFlow's choice), the original with
its own `tf.Session()`'s (`--original_inter_op_threads`, default TF1's choice).

`--profile` records one step of each side with tf.profiler and prints where the CPU time goes per
op type (self time summed over the executor's threads).
"""

import collections
import contextlib
import glob
import os
import re
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("sizes", ["128x256", "256x512"], "Training sizes HxW (modules from 4x8 up to the size).")
flags.DEFINE_integer("steps", 3, "Timed steps per side and size (after one warm-up step).")
flags.DEFINE_list(
    "variants",
    ["current"],
    "crn_tf sides: current, remat, jit_compile, concat_conv1, reference_in_tape, conv2d_forward.",
)
flags.DEFINE_boolean("jit_compile", False, "XLA-compile crn_tf's replica step.")
flags.DEFINE_boolean("remat", False, "Every crn_tf side with --remat (the `remat` variant: only that side).")
flags.DEFINE_boolean("profile", False, "Profile one step of each side and print the time per op type.")
flags.DEFINE_integer("top", 15, "Op types listed by --profile.")
flags.DEFINE_integer(
    "inter_op_threads", None, "crn_tf's inter-op threads (crn-train's --inter_op_threads; default TF's choice)."
)
flags.DEFINE_integer(
    "original_inter_op_threads", 0, "The original's Session's inter-op threads (0: TF1's default, as tf.Session())."
)
FLAGS = flags.FLAGS

VGG19 = [(3, 64), (64, 64), "pool", (64, 128), (128, 128), "pool", (128, 256), (256, 256), (256, 256), (256, 256)]
VGG19 += ["pool", (256, 512), (512, 512), (512, 512), (512, 512), "pool", (512, 512), (512, 512)]
VGG_NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4"]
VGG_NAMES += ["conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2"]
WRAPPERS = ("PartitionedCall", "StatefulPartitionedCall", "While", "If", "StatelessIf", "Run", "Process")
LOSS_LAYERS = ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2")


def network(h: int, w: int):
    """The CRNConfig of the compared network: modules 4x8 .. h x w, paper widths, 20 channels, k = 1."""
    from crn_tf.config import LAYER_WEIGHTS_512P, CRNConfig, paper_widths

    modules = 1
    while 4 * 2 ** (modules - 1) < h:
        modules += 1
    if (4 * 2 ** (modules - 1), 8 * 2 ** (modules - 1)) != (h, w):
        raise ValueError(f"--sizes: {h}x{w} is not 4x8 times a power of two")
    return CRNConfig(name=f"vs_original_{h}x{w}", widths=paper_widths(modules), layer_weights=LAYER_WEIGHTS_512P)


def build_original(config, h: int, w: int, seed: int = 0):
    """The authors' training step as a TF1 graph. Returns (session, train_op, loss, layout, image)."""
    import numpy as np
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        layout = v1.placeholder(tf.float32, [1, h, w, config.input_channels], name="label")
        image = v1.placeholder(tf.float32, [1, h, w, 3], name="real_image")

        def lrelu(x):
            return tf.maximum(0.2 * x, x)

        glorot = v1.glorot_uniform_initializer

        def conv_ln_lrelu(x, width, scope):  # slim.conv2d(normalizer_fn=slim.layer_norm, activation_fn=lrelu)
            with v1.variable_scope(scope):
                weights = v1.get_variable("weights", [3, 3, x.shape[-1], width], initializer=glorot())
                x = tf.nn.conv2d(x, weights, strides=[1, 1, 1, 1], padding="SAME")
                with v1.variable_scope("LayerNorm"):
                    beta = v1.get_variable("beta", [width], initializer=v1.zeros_initializer())
                    gamma = v1.get_variable("gamma", [width], initializer=v1.ones_initializer())
                    mean, variance = tf.nn.moments(x, [1, 2, 3], keepdims=True)
                    x = tf.nn.batch_normalization(x, mean, variance, beta, gamma, variance_epsilon=1e-12)
                return lrelu(x)

        heights = [4 * 2**i for i in range(config.num_modules)]

        def recursive_generator(label, i):
            sp = heights[i]
            if i == 0:
                x = label
            else:
                downsampled = v1.image.resize_area(label, (sp // 2, sp), align_corners=False)
                previous = recursive_generator(downsampled, i - 1)
                upsampled = v1.image.resize_bilinear(previous, (sp, sp * 2), align_corners=True)
                x = tf.concat([upsampled, label], 3)
            x = conv_ln_lrelu(x, config.widths[i], f"g_{sp}_conv1")
            x = conv_ln_lrelu(x, config.widths[i], f"g_{sp}_conv2")
            if i == config.num_modules - 1:
                with v1.variable_scope(f"g_{sp}_conv100"):
                    weights = v1.get_variable("weights", [1, 1, x.shape[-1], 3], initializer=glorot())
                    biases = v1.get_variable("biases", [3], initializer=v1.zeros_initializer())
                    x = tf.nn.conv2d(x, weights, strides=[1, 1, 1, 1], padding="SAME") + biases
                x = (x + 1.0) / 2.0 * 255.0
            return x

        generator = recursive_generator(layout, config.num_modules - 1)
        generator_vars = v1.trainable_variables()

        rng = np.random.default_rng(seed)
        vgg_weights = []
        for layer in VGG19:
            if layer != "pool":
                cin, cout = layer
                limit = np.sqrt(6 / (9 * cin + 9 * cout))  # Glorot uniform, as crn_tf's weights=none
                kernel = rng.uniform(-limit, limit, [3, 3, cin, cout]).astype(np.float32)
                vgg_weights.append((tf.constant(kernel), tf.constant(np.zeros(cout, np.float32))))

        def build_vgg19(x):  # the original's build_vgg19: constants, conv + bias + relu, average pools
            net = {"input": x - np.array([123.6800, 116.7790, 103.9390]).reshape((1, 1, 1, 3)).astype(np.float32)}
            x, convs = net["input"], iter(zip(VGG_NAMES, vgg_weights))
            for layer in VGG19:
                if layer == "pool":
                    x = tf.nn.avg_pool(x, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME")
                else:
                    name, (kernel, bias) = next(convs)
                    x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME") + bias)
                    net[name] = x
            return net

        vgg_real = build_vgg19(image)
        vgg_fake = build_vgg19(generator)
        weights = config.layer_weights
        loss = weights[0] * tf.reduce_mean(tf.abs(vgg_fake["input"] - vgg_real["input"]))
        for weight, name in zip(weights[1:], LOSS_LAYERS):
            loss += weight * tf.reduce_mean(tf.abs(vgg_fake[name] - vgg_real[name]))
        train_op = v1.train.AdamOptimizer(learning_rate=1e-4).minimize(loss, var_list=generator_vars)
        # An explicit default ConfigProto, as the authors' tf.Session() had in TF1 (TF2's compat Session
        # would otherwise take the TF2 context's threading), with the session's own inter-op pool.
        session_config = v1.ConfigProto(
            inter_op_parallelism_threads=FLAGS.original_inter_op_threads, use_per_session_threads=True
        )
        session = v1.Session(graph=graph, config=session_config)
        session.run(v1.global_variables_initializer())
        parameters = sum(int(np.prod(v.shape)) for v in generator_vars)
    return session, train_op, loss, layout, image, parameters


@contextlib.contextmanager
def variant(name: str):
    """Undoes one of this change's speed-ups while a crn_tf step is traced (the ablation's sides)."""
    import tensorflow as tf

    from crn_tf.layers import RefinementModule
    from crn_tf.train import Trainer

    saved = []
    if name == "concat_conv1":

        def concat_conv1(self, upsampled, layout, fast=False):  # Keras' Conv2D: no CPU form either way
            return self.conv1(tf.concat([upsampled, layout], axis=-1))

        saved.append((RefinementModule, "_split_conv1", RefinementModule._split_conv1))
        RefinementModule._split_conv1 = concat_conv1
    elif name == "reference_in_tape":

        def replica_gradients(self, batch):
            layout, image = batch["layout"], batch["image"]
            with tf.GradientTape() as tape:
                fake = self.model(layout, training=True)
                terms = self.loss(image, fake, layout)
                loss = tf.nn.compute_average_loss(terms["total"], global_batch_size=self.global_batch_size)
            grads = tape.gradient(loss, self.model.trainable_variables)
            return grads, {k: tf.reduce_sum(v) / self.global_batch_size for k, v in terms.items()}

        saved.append((Trainer, "_replica_gradients", Trainer._replica_gradients))
        Trainer._replica_gradients = replica_gradients
    elif name == "conv2d_forward":
        from crn_tf import tf_ops

        saved.append((tf_ops, "onednn_cpu_only", tf_ops.onednn_cpu_only))
        tf_ops.onednn_cpu_only = lambda: False
    elif name not in ("current", "remat", "jit_compile"):
        raise ValueError(
            f"--variants: unknown variant {name!r}; expected current, remat, jit_compile, concat_conv1, "
            "reference_in_tape, conv2d_forward"
        )
    try:
        yield
    finally:
        for owner, attribute, value in saved:
            setattr(owner, attribute, value)


def op_times(logdir: str) -> tuple[collections.Counter, collections.Counter]:
    """Seconds of CPU time per op type in a tf.profiler trace (op events' self time, all threads),
    and of that, the seconds during which a convolution ran on another thread at the same time (on
    a 2-core machine two ops share the cores then, so both take longer than they would alone)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals = collections.Counter()
    leaves = []  # (start, end, op type, thread) of every counted op event
    for path in glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                # Op events are "name:Type"; function calls nest other ops, so only leaves are counted.
                events = sorted(
                    (e.offset_ps, e.offset_ps + e.duration_ps, plane.event_metadata[e.metadata_id].name)
                    for e in line.events
                )
                stack = []
                for start, end, name in events:
                    while stack and stack[-1][1] <= start:
                        stack.pop()
                    if ":" not in name or name.startswith("$"):
                        continue
                    op_type = name.rsplit(":", 1)[1].strip()
                    # Only kernels: not the function calls that enclose them, nor executor wrappers.
                    if not re.fullmatch(r"_?[A-Z][A-Za-z0-9_]*", op_type) or op_type in WRAPPERS:
                        continue
                    if stack:  # the enclosing op's self time excludes this one
                        totals[stack[-1][2]] -= (end - start) / 1e12
                    totals[op_type] += (end - start) / 1e12
                    stack.append((start, end, op_type))
                    leaves.append((start, end, op_type, (plane.name, line.id)))
    # The intervals during which a convolution runs, per thread (line); an op's concurrent time is its
    # largest overlap with the convolutions of any one other thread.
    conv_by_line = collections.defaultdict(list)
    for start, end, op_type, line in leaves:
        if "Conv2D" in op_type:
            conv_by_line[line].append((start, end))
    concurrent = collections.Counter()
    for start, end, op_type, line in leaves:
        overlap = 0
        for other, intervals in conv_by_line.items():
            if other != line:
                overlap = max(overlap, sum(max(0, min(end, e) - max(start, s)) for s, e in intervals))
        concurrent[op_type] += overlap / 1e12
    return totals, concurrent


def print_profile(title: str, times: tuple[collections.Counter, collections.Counter], seconds: float) -> None:
    totals, concurrent = times
    total = sum(v for v in totals.values() if v > 0)
    print(f"\n{title}: {seconds:.2f} s wall, {total:.2f} s of op time over the threads")
    print("| op type | s | share | s while a convolution ran on another thread |")
    print("|---|---|---|---|")
    for op_type, value in totals.most_common(FLAGS.top):
        print(f"| {op_type} | {value:.2f} | {value / total:.1%} | {concurrent[op_type]:.2f} |")
    convs = sum(v for k, v in totals.items() if "Conv2D" in k)
    print(f"| all Conv2D (forward and backward) | {convs:.2f} | {convs / total:.1%} | |")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from crn_tf.config import parse_size
    from crn_tf.distribution import configure_threads
    from crn_tf.train import TrainConfig, Trainer

    threads = configure_threads(FLAGS.inter_op_threads)  # as crn-train does, before TensorFlow starts
    print(f"CPU cores: {os.cpu_count()}, TensorFlow {tf.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"crn_tf: {threads}; original: inter-op threads {FLAGS.original_inter_op_threads or 'TF default'}")
    results = []
    for size in FLAGS.sizes:
        h, w = parse_size(size, "--sizes")
        config = network(h, w)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.input_channels, [1, h, w])
        layout_np = np.eye(config.input_channels, dtype=np.float32)[ids]
        image_np = rng.uniform(0, 255, [1, h, w, 3]).astype(np.float32)

        session, train_op, loss, layout_ph, image_ph, original_parameters = build_original(config, h, w)
        feed = {layout_ph: layout_np, image_ph: image_np}
        sides = {"original": lambda s=session, ops=[train_op, loss], feed=feed: s.run(ops, feed)[1]}
        model_dirs = []
        batch = {"layout": tf.constant(layout_np), "image": tf.constant(image_np)}
        for name in FLAGS.variants:
            model_dirs.append(tempfile.TemporaryDirectory())
            train_config = TrainConfig(
                batch_size=1,
                vgg_weights="none",
                jit_compile=FLAGS.jit_compile or name == "jit_compile",
                remat=FLAGS.remat or name == "remat",
            )
            trainer = Trainer(config, train_config, model_dirs[-1].name, log=lambda *a, **k: None)
            if trainer.model.count_params() != original_parameters:
                raise RuntimeError(f"parameters differ: {trainer.model.count_params()} vs {original_parameters}")
            it = iter(trainer.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
            step = trainer.train_step
            with variant(name):
                start = time.perf_counter()
                float(step(it)[0]["total"])  # trace + warm-up, with the variant's code
                print(f"{size} {name}: trace + first step {time.perf_counter() - start:.1f} s")
            sides[name] = lambda step=step, it=it: step(it)[0]["total"].numpy()
        start = time.perf_counter()
        sides["original"]()
        print(f"{size} original: first step {time.perf_counter() - start:.1f} s")

        if FLAGS.profile:
            for name, run in sides.items():
                logdir = tempfile.mkdtemp(prefix=f"profile_{name}_")
                tf.profiler.experimental.start(logdir)
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
                tf.profiler.experimental.stop()
                print_profile(f"{size} {name}", op_times(logdir), seconds)

        times = collections.defaultdict(list)
        for _ in range(FLAGS.steps):
            for name, run in sides.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        original = float(np.median(times["original"]))
        for name in sides:
            median = float(np.median(times[name]))
            steps = ", ".join(f"{t:.2f}" for t in times[name])
            results.append((size, name, median, median / original, steps))
        session.close()
        for d in model_dirs:
            d.cleanup()
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; XLA {FLAGS.jit_compile}; remat {FLAGS.remat}")
    print("| size | side | median s/step | / original | timed steps (s), alternating |")
    print("|---|---|---|---|---|")
    for size, name, median, ratio, steps in results:
        print(f"| {size} | {name} | {median:.2f} | {ratio:.2f} | {steps} |")


if __name__ == "__main__":
    app.run(main)
