"""Input pipeline speed: conversion images/s and make_dataset examples/s at 256x512.

    PYTHONPATH=. python benchmarks/input_pipeline.py --count=64 --workers=1,2   # ~1 min on 2 cores

Generates `count` synthetic 256x512 scenes (data_tools.synthetic), converts them with
data_tools.common.convert for each number of workers (full resolution, PNG), then times the
training pipeline (parse, area/nearest resize to 256x512, flip, one-hot with 20 channels, batch,
prefetch) over the shards. Prints a markdown table for benchmarks/README.md.
"""

import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("count", 64, "Synthetic scenes to convert.")
flags.DEFINE_string("size", "256x512", "HxW of scenes and of the training size.")
flags.DEFINE_list("workers", ["1", "2"], "Numbers of converter threads to time.")
flags.DEFINE_integer("batch_size", 8, "Global batch size of the pipeline.")
flags.DEFINE_integer("batches", 40, "Batches timed (after 5 warm-up batches).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from crn_tf import data
    from data_tools import cityscapes, common, synthetic

    h, w = common.parse_size(FLAGS.size, "--size")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(f"{tmp}/raw", "train", FLAGS.count, h, w, seed=0)
        source = cityscapes.make_source(f"{tmp}/raw", "train")
        for workers in (int(v) for v in FLAGS.workers):
            start = time.perf_counter()
            common.convert(source, f"{tmp}/tfr", "train", num_shards=4, workers=workers)
            rate = FLAGS.count / (time.perf_counter() - start)
            rows.append((f"conversion ({FLAGS.count} pairs, PNG, full size)", workers, f"{rate:.1f} images/s"))
        ds = data.make_dataset(f"{tmp}/tfr", "train", batch_size=FLAGS.batch_size, image_size=(h, w), seed=0)
        it = iter(ds)
        for _ in range(5):
            next(it)
        start = time.perf_counter()
        for _ in range(FLAGS.batches):
            batch = next(it)
        batch["layout"].numpy()
        rate = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)
        threads = "tf.data AUTOTUNE"
        rows.append(
            (f"make_dataset (batch {FLAGS.batch_size}, {h}x{w}, flip, one-hot 20)", threads, f"{rate:.1f} ex/s")
        )
    print(f"\nCPU cores: {os.cpu_count()}, TensorFlow {tf.__version__}\n")
    print("| stage | workers | rate |\n|---|---|---|")
    for stage, workers, rate in rows:
        print(f"| {stage} | {workers} | {rate} |")


if __name__ == "__main__":
    app.run(main)
