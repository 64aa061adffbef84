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
flags.DEFINE_integer("train_steps", 5, "Training steps of the tiny preset timed for the ratio.")
FLAGS = flags.FLAGS


def _tiny_training_rate(ds, steps: int) -> float:
    """Examples/s of crn_tf.train's step for the tiny preset (VGG-19 weights none: same cost)."""
    from crn_tf.config import get_preset
    from crn_tf.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig(batch_size=FLAGS.batch_size, vgg_weights="none")
        trainer = Trainer(get_preset("tiny"), config, model_dir, log=lambda *a, **k: None)
        step = trainer.train_step
        batches = ds.take(1).cache().repeat()  # the same batch: time training only, not the pipeline
        it = iter(trainer.strategy.experimental_distribute_dataset(batches))
        float(step(it)[0]["total"])  # trace
        start = time.perf_counter()
        for _ in range(steps):
            out = step(it)
        float(out[0]["total"])
        return steps * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    import tensorflow as tf

    from crn_tf import data
    from crn_tf.config import parse_size
    from data_tools import cityscapes, common, synthetic

    h, w = parse_size(FLAGS.size, "--size")
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
        # The pipeline must outrun training: time the `tiny` preset's training step on the same batches.
        train_rate = _tiny_training_rate(ds, FLAGS.train_steps)
        rows.append(
            (f"training, tiny preset (batch {FLAGS.batch_size}, {h}x{w}, VGG-19)", "-", f"{train_rate:.1f} ex/s")
        )
        rows.append(("ratio: pipeline / tiny training", "-", f"{rate / train_rate:.1f}x (target >= 10x)"))
    print(f"\nCPU cores: {os.cpu_count()}, TensorFlow {tf.__version__}\n")
    print("| stage | workers | rate |\n|---|---|---|")
    for stage, workers, rate in rows:
        print(f"| {stage} | {workers} | {rate} |")


if __name__ == "__main__":
    app.run(main)
