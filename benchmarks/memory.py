"""Activation memory per image of a training step and of inference, estimated from the architecture.

    PYTHONPATH=. python benchmarks/memory.py                    # the presets table (instant)
    PYTHONPATH=. python benchmarks/memory.py --measure=demo     # + measured peak RSS of one step (~1 min)

Training keeps, per pixel of each module, the upsampled features, the concatenation, and the six
outputs of conv/norm/LeakyReLU x2 (2 d_prev + C + 6 d floats), plus VGG-19's activations (two
tensors per conv) of the reference and of each of the k synthesized images. Inference keeps only
the largest module's working set. float32; parameters and Adam's two slots are listed apart
(4 bytes x 3 per parameter). `--measure` checks the estimate against the peak resident memory of
a process that runs one training step (the difference is TensorFlow's own overhead and workspace).
"""

import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("measure", None, "A preset to run batch-1 training steps of, to check the estimate.")
flags.DEFINE_string("measure_size", None, "HxW for --measure (default: the preset's native size).")
FLAGS = flags.FLAGS

VGG19 = [(64, 0), (64, 0), (128, 1), (128, 1), (256, 2), (256, 2), (256, 2), (256, 2)]
VGG19 += [(512, 3)] * 4 + [(512, 4)] * 2  # (channels, pools before) up to conv5_2


def generator_floats(config, h: int, w: int) -> tuple[float, float]:
    """(training activations, inference peak) in floats, for one image at h x w."""
    train, peak, prev = 0.0, 0.0, 0
    for i, width in enumerate(config.widths):
        scale = 2 ** (config.num_modules - 1 - i)
        pixels = (h // scale) * (w // scale)
        train += pixels * (2 * prev + 2 * config.input_channels + 6 * width)
        peak = max(peak, pixels * (2 * prev + config.input_channels + 2 * width))
        prev = width
    return train + h * w * 3 * config.num_outputs, peak


def vgg_floats(h: int, w: int) -> float:
    return sum(2 * c * (h // 2**p) * (w // 2**p) for c, p in VGG19)


def estimate(config, h: int, w: int) -> dict:
    gen_train, gen_peak = generator_floats(config, h, w)
    train = gen_train + vgg_floats(h, w) * (1 + config.num_outputs)
    return {
        "train_gb": train * 4 / 2**30,
        "infer_gb": gen_peak * 4 / 2**30,
        "params_gb": config.num_parameters() * 12 / 2**30,
    }


MEASURE = """
import resource, sys, tempfile, numpy as np, tensorflow as tf
from crn_tf.config import get_preset
from crn_tf.train import Trainer, TrainConfig
c = get_preset(sys.argv[1]); h, w = int(sys.argv[2]), int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as d:
    t = Trainer(c, TrainConfig(batch_size=1, vgg_weights="none"), d, log=lambda *a, **k: None)
    layout = tf.one_hot(np.random.randint(0, 20, [1, h, w]), 20)
    batch = {"layout": layout, "image": tf.random.uniform([1, h, w, 3], 0, 255)}
    it = iter(t.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    step = t.train_step
    float(step(it)[0]["total"])
    float(step(it)[0]["total"])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


def main(argv):
    del argv
    from crn_tf.config import PRESETS

    print("| preset | size | parameters | training activations / image | + params, Adam | inference / image |")
    print("|---|---|---|---|---|---|")
    for name, config in PRESETS.items():
        h, w = config.native_size
        e = estimate(config, h, w)
        print(
            f"| {name} | {h}x{w} | {config.num_parameters() / 1e6:.1f}M | {e['train_gb']:.2f} GB "
            f"| {e['params_gb']:.2f} GB | {e['infer_gb']:.2f} GB |"
        )
    if FLAGS.measure:
        from crn_tf.config import parse_size

        config = PRESETS[FLAGS.measure]
        h, w = parse_size(FLAGS.measure_size, "--measure_size") if FLAGS.measure_size else config.native_size
        e = estimate(config, h, w)
        args = [sys.executable, "-c", MEASURE, FLAGS.measure, str(h), str(w)]
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        measured = float(out.stdout.strip().splitlines()[-1])
        print(f"\n{FLAGS.measure} at {h}x{w}: estimated {e['train_gb'] + e['params_gb']:.2f} GB (activations + ")
        print(f"parameters and Adam); measured peak RSS growth over two training steps: {measured:.2f} GB")


if __name__ == "__main__":
    app.run(main)
