"""crn-train's step on TensorFlow and on JAX, the same network and batch, alternated in one run.

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/backends_step.py                  # 64x128, ~5 min on 2 cores
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/backends_step.py --sizes=16x32 --widths=tiny --steps=2

The backend is fixed when Keras is imported, so each backend's trainer lives in its own worker process
(`Trainer` on TensorFlow, `JaxTrainer` on JAX, each with its real `train_step` on an in-memory batch);
the parent tells them to step in turn (so load from other jobs hits both alike), after `--warmup`
untimed steps each (the first traces and compiles), and prints the medians and the JAX / TensorFlow
ratio. The network: modules from 4x8 up to the size, paper widths (1024, and 512 from 128x256 up;
`--widths=tiny`: the tiny preset's), k = 1, batch 1, the perceptual loss with a random VGG-19 (the
same cost as ImageNet's), Adam 1e-4, float32.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alternate import alternate, start_worker  # noqa: E402 - this folder's helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["64x128"], "HxW of the layouts")
flags.DEFINE_integer("steps", 5, "timed steps per backend per size (alternated)")
flags.DEFINE_integer("warmup", 2, "untimed steps first, per backend")
flags.DEFINE_enum("widths", "paper", ["paper", "tiny"], "paper widths or the tiny preset's (16x32 only)")

WORKER = r"""
import sys, tempfile
import numpy as np, tensorflow as tf, keras
from crn_tf.api import one_hot
from crn_tf.config import CRNConfig, LAYER_WEIGHTS_512P, get_preset, paper_widths
from crn_tf.experiment import TrainConfig

h, w, widths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
modules = (h // 4).bit_length()
chosen = paper_widths(modules) if widths == "paper" else get_preset("tiny").widths[:modules]
config = CRNConfig(name="bench", widths=chosen, num_outputs=1, layer_weights=LAYER_WEIGHTS_512P)
tc = TrainConfig(batch_size=1, vgg_weights="none", steps=10**9, image_every=10**9, checkpoint_every=10**9)
if keras.backend.backend() == "jax":
    from crn_tf.jax_trainer import JaxTrainer as make
else:
    from crn_tf.trainer import Trainer as make
trainer = make(config, tc, tempfile.mkdtemp(), log=lambda *a, **k: None)
rng = np.random.default_rng(0)
batch = {"layout": one_hot(rng.integers(0, 20, (1, h, w)), config.num_classes),
         "image": rng.uniform(0, 255, (1, h, w, 3)).astype("float32")}
iterator = trainer._iterator(tf.data.Dataset.from_tensors(batch).repeat())
"""


def main(argv):
    del argv
    print(f"widths {FLAGS.widths}, batch 1, float32; load average at start {os.getloadavg()[0]:.1f}")
    print("| size | TensorFlow s/step | JAX s/step | JAX / TensorFlow |\n|---|---|---|---|")
    for size in FLAGS.sizes:
        h, w = (int(x) for x in size.split("x"))
        if FLAGS.widths == "tiny" and (h, w) != (16, 32):
            raise SystemExit("--widths=tiny: the tiny preset's 3 modules make 16x32 layouts; pass --sizes=16x32")
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
        workers = {
            b: start_worker(WORKER, [str(h), str(w), FLAGS.widths], {**env, "KERAS_BACKEND": b}, b)
            for b in ("tensorflow", "jax")
        }
        times = alternate(workers, FLAGS.warmup, FLAGS.steps)
        tf_s, jax_s = statistics.median(times["tensorflow"]), statistics.median(times["jax"])
        print(f"| {size} | {tf_s:.3f} | {jax_s:.3f} | {jax_s / tf_s:.2f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    app.run(main)
