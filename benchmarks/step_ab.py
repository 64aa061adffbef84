"""The TensorFlow training step of two source trees (e.g. before and after a change), alternated in one run.

    git worktree add /tmp/before <commit>
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/step_ab.py --a=/tmp/before --b=. --sizes=128x256   # ~6 min

Each tree's `crn_tf.trainer.Trainer` runs in its own worker process (its own `crn_tf` on PYTHONPATH), on
the same network and in-memory batch: modules from 4x8 up to the size, paper widths (1024, and 512
from 128x256 up), k = 1, batch 1, the perceptual loss with a random VGG-19, Adam 1e-4, float32. After
`--warmup` untimed steps each (the first traces), the parent tells them to step in turn (so load from
other jobs hits both alike) and prints the medians and the b / a ratio.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alternate import alternate, start_worker  # noqa: E402 - this folder's helper

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "the first source tree (a checkout of crn_tf)", required=True)
flags.DEFINE_string("b", ".", "the second source tree")
flags.DEFINE_list("sizes", ["128x256"], "HxW of the layouts")
flags.DEFINE_integer("steps", 5, "timed steps per tree per size (alternated)")
flags.DEFINE_integer("warmup", 1, "untimed steps first, per tree")

WORKER = r"""
import sys, tempfile
import numpy as np, tensorflow as tf
from crn_tf.config import CRNConfig, LAYER_WEIGHTS_512P, paper_widths
from crn_tf.trainer import Trainer
from crn_tf.train import TrainConfig

h, w = int(sys.argv[1]), int(sys.argv[2])
widths = paper_widths((h // 4).bit_length())
config = CRNConfig(name="ab", widths=widths, num_outputs=1, layer_weights=LAYER_WEIGHTS_512P)
tc = TrainConfig(batch_size=1, vgg_weights="none", steps=10**9, image_every=10**9, checkpoint_every=10**9)
trainer = Trainer(config, tc, tempfile.mkdtemp(), log=lambda *a, **k: None)
rng = np.random.default_rng(0)
ids = rng.integers(0, 20, (1, h, w))
batch = {"layout": tf.one_hot(ids, 20, dtype=tf.float32), "image": rng.uniform(0, 255, (1, h, w, 3)).astype("float32")}
iterator = iter(trainer.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
"""


def main(argv):
    del argv
    print(f"a = {FLAGS.a}, b = {FLAGS.b}; load average at start {os.getloadavg()[0]:.1f}")
    print("| size | a s/step | b s/step | b / a | timed steps a; b |\n|---|---|---|---|---|")
    for size in FLAGS.sizes:
        h, w = (int(x) for x in size.split("x"))
        workers = {}
        for name, tree in (("a", FLAGS.a), ("b", FLAGS.b)):
            tree = os.path.abspath(tree)
            env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": tree}
            workers[name] = start_worker(WORKER, [str(h), str(w)], env, tree, cwd=tree)
        times = alternate(workers, FLAGS.warmup, FLAGS.steps)
        a, b = statistics.median(times["a"]), statistics.median(times["b"])
        runs = f"{', '.join(f'{t:.2f}' for t in times['a'])}; {', '.join(f'{t:.2f}' for t in times['b'])}"
        print(f"| {size} | {a:.2f} | {b:.2f} | {b / a:.2f} | {runs} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    app.run(main)
